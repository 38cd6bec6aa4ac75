"""The driver's reaper: when a `segpipe run`/`serve`/`demo` process dies, however it dies,
the processes it started die with it.

A driver starts an embedded Prefect server and, without RAY_ADDRESS, a local Ray (GCS,
raylet, dashboard, workers). Killed with SIGKILL (the OOM killer, `kill -9`), it cannot stop
them: they would hold ports, memory and the Ray session for good. Nothing in Prefect or
Ray ends them on their parent's death, and setting the parent-death signal would mean
patching how both libraries start processes, so a small watcher does it: `start()` spawns
this module in a session of its own; it notes the driver's descendants every
POLL_S and, once the driver is gone, terminates the ones it last saw (then kills what is
left after GRACE_S); one whose pid was reused is not touched (processes are matched by pid
and start time). A process started after the last look is found by the mark the driver
leaves in its environment (MARK_ENV: its pid and start time), which everything it starts
inherits: Ray's raylet starts its agents a moment after itself, and a raylet that exits on
its own when the driver dies leaves them to init, no longer anyone's descendants.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 5.0
MARK_ENV = "SEGPIPE_DRIVER"


def start() -> subprocess.Popen | None:
    """Watch this process; returns the watcher (None where psutil is missing)."""
    try:
        import psutil  # noqa: F401  (Ray's dependency; checked before spawning)
    except ImportError:
        return None
    os.environ[MARK_ENV] = _mark(os.getpid())  # before Prefect and Ray start: they inherit it
    return subprocess.Popen(
        [sys.executable, "-m", "flows.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the terminal's group: Ctrl-C is for the driver
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip


def watch(driver_pid: int) -> None:
    """Follow `driver_pid` until it is gone, then end the descendants it left."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    mark = _mark(driver_pid)
    seen: list[psutil.Process] = []
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            seen = [p for p in driver.children(recursive=True) if p.pid != os.getpid()]
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = [p for p in seen if p.is_running()]  # is_running compares the start time too
    left += [p for p in _marked(mark) if p not in left]
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _mark(pid: int) -> str:
    import psutil

    return f"{pid}:{psutil.Process(pid).create_time()}"


def _marked(mark: str) -> list:
    """The running processes that carry this driver's mark (never this watcher)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(MARK_ENV) == mark:
                found.append(process)
        except psutil.Error:  # gone, or another user's
            pass
    return found


if __name__ == "__main__":
    watch(int(sys.argv[1]))
