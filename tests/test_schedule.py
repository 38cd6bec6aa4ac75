"""Schedules that fire, on a real Prefect server with its scheduler on (loopback only).

`segpipe serve` registers the nightly deployment with the server and runs what its
scheduler schedules. A broken scheduler (Prefect 3.8 with SQLAlchemy 2.1 failed every loop)
registers fine and then never runs anything: only a test that waits for runs sees it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest

from tests.prefect_fixtures import PrefectServer
from tests.prefect_fixtures import stop_process as _stop

pytestmark = pytest.mark.slow  # a Prefect server, a serving process and two scheduled runs

INTERVAL_S = 20  # between scheduled runs; a run of two tiny images takes ~10 s here


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server for the module; yields the environment a client needs."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    client_home = tmp_path_factory.mktemp("prefect-client")
    yield {"PREFECT_API_URL": server.api, "PREFECT_HOME": str(client_home), "SERVER_LOG": str(server.log_path)}
    server.stop()


def _flow_runs(api: str) -> list[dict]:
    body = {"flows": {"name": {"any_": ["segment-collection"]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


def _write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def _run_logs(api: str) -> str:
    """The runs' own log lines from the server, for a failure message."""
    try:
        logs = httpx.post(f"{api}/logs/filter", json={"sort": "TIMESTAMP_ASC"}, timeout=10).json()
        return "\n".join(f"{entry['name']}: {entry['message']}"[:400] for entry in logs[-40:])
    except httpx.HTTPError as exc:
        return f"(no run logs: {exc})"


def _wait_for(condition, timeout: float, what: str, serving: subprocess.Popen, log: Path, api: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if serving.poll() is not None:
            pytest.fail(f"segpipe serve exited ({serving.returncode}): {log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"{what} within {timeout:.0f} s; the process said: {log.read_text()[-3000:]}\n"
                f"the runs logged: {_run_logs(api) if api else ''}")


def test_served_schedule_fires_and_each_run_does_only_what_is_new(
    prefect_server: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    api = prefect_server["PREFECT_API_URL"]
    archive, out = tmp_path / "archive", tmp_path / "out"
    for i in range(2):
        _write_png(archive / f"x{i}.png", seed=i)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": prefect_server["PREFECT_HOME"],
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    log = tmp_path / "serve.log"
    serving = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(archive), "-m", str(tiny_checkpoint), "-o", str(out),
         "--interval", str(INTERVAL_S), "--tile", "32", "--export", "none", "--keep-paths"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        def completed(n: int):
            runs = [r for r in _flow_runs(api) if r["state_type"] == "COMPLETED"]
            return runs if len(runs) >= n else None

        first = _wait_for(lambda: completed(1), 180, "no scheduled run completed", serving, log)
        record = json.loads((out / "segpipe-run.json").read_text())
        assert sorted(r["state"] for r in record["images"]) == ["complete", "complete"]

        _write_png(archive / "x2.png", seed=2)  # arrives between two runs
        runs = _wait_for(lambda: completed(len(first) + 1), 180, "no second scheduled run", serving, log)
        assert len(runs) >= 2
        record = json.loads((out / "segpipe-run.json").read_text())
        states = {Path(r["input"]).name: (r["state"], r["reused"]) for r in record["images"]}
        assert states["x2.png"] == ("complete", False)  # the new file, picked up
        assert states["x0.png"] == ("complete", True) and states["x1.png"] == ("complete", True)
    finally:
        code = _stop(serving, signal.SIGTERM)
    assert code == 0, log.read_text()[-3000:]  # SIGTERM stops serve cleanly


def test_prefect_yaml_deploys_and_a_worker_runs_it(prefect_server: dict[str, str], tiny_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    """deploy/prefect.yaml as its comments say to use it: a process work pool, `prefect
    deploy` from the repository root, a worker where the project is installed
    (SEGPIPE_HOME: here this checkout), and a run of the deployment with this test's
    archive, model and output in place of the production paths."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PREFECT_API_URL": prefect_server["PREFECT_API_URL"],
           "PREFECT_HOME": prefect_server["PREFECT_HOME"], "SEGPIPE_HOME": str(repo),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip

    def prefect(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=repo, capture_output=True,
                              text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout[-1500:]} {done.stderr[-1500:]}"
        return done

    prefect("work-pool", "create", "segpipe", "--type", "process")
    prefect("--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all")
    api = prefect_server["PREFECT_API_URL"]
    deployments = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
    assert set(deployments) == {"nightly", "pacs-nightly"}  # the archive's and the PACS's
    deployment = deployments["nightly"]
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert deployment["global_concurrency_limit"]["limit"] == 1  # the same as `segpipe serve` gives its runs

    archive, out = tmp_path / "archive", tmp_path / "out"
    _write_png(archive / "x0.png", seed=0)
    params = {"inputs": [str(archive)], "model": str(tiny_checkpoint), "out": str(out),
              "config": {"tile": 32, "exports": ["overlay"]}}  # fmt: skip
    # the production Ray address of prefect.yaml replaced by a local Ray, as the run's job variable
    local_ray = json.dumps({"RAY_ADDRESS": "", "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,flows"})
    started = prefect("deployment", "run", "segment-collection/nightly", "--params", json.dumps(params),
                      "--job-variable", f"env={local_ray}")
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout).group(1)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "segpipe"], env=env,
                              cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        def finished():
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state_type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait_for(finished, 480, "the deployment's run did not finish", worker, log, api)
        assert state == "COMPLETED", log.read_text()[-3000:]
        record = json.loads((out / "segpipe-run.json").read_text())
        assert [r["state"] for r in record["images"]] == ["complete"]
        assert list(out.glob("*.overlay.png"))
    finally:
        _stop(worker, signal.SIGTERM)
