"""When the Prefect API stays unreachable: the run goes on without it.

Prefect must never be the reason a run fails. Its client retries 503s, timeouts and
refused connections with backoff (flows/preflight.py sizes that); when the API is still
unreachable after that, the run that was under way is done again without it: one line
says so, and a child process runs the same collection (the same flows, the same code) on
a private embedded Prefect that is thrown away afterwards. Its results are what a run
keeps anyway: the stores and the run record (OUT/segpipe-run.json), read back here for
the summary and the exit code, which follow the images, not Prefect. Images already
complete are reused by the skip-complete rule, so no finished tile runs twice.

Why a child process and not the same one: the dead API's client, log and event workers
live on in this process (settings read once, queues that retry every item with backoff),
and a second run here would send its logs to them.

An error counts as Prefect's only when it is one (`api_failure`): a transport error or a
5xx/408/429 answer to a request of Prefect's client, an embedded server that did not
start, or the API failing its health check when a run ended with failed images. A bad
input, a PACS or storage that fails, stays the run's error.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from flows.runs import ApiUnreachable

log = logging.getLogger(__name__)
FALLBACK_ENV = "SEGPIPE_PREFECT_FALLBACK"  # set in the child: it does not fall back again
RETRIED_CODES = frozenset({408, 429, 500, 502, 503, 504})
EPHEMERAL_TIMEOUT = "ephemeral Prefect API server"  # Prefect's message when it did not start

_went_offline = False


def api_failure(exc: BaseException) -> str | None:
    """Why Prefect's API failed, in a few words, when `exc` (or an error it carries) is
    that; None when it is any other error."""
    for error in _chain(exc):
        if isinstance(error, ApiUnreachable):
            return error.reason
        if isinstance(error, httpx.HTTPStatusError) and _from_prefect(error.request):
            code = error.response.status_code
            if code in RETRIED_CODES:
                return f"{code} {error.response.reason_phrase}".strip()
        elif isinstance(error, httpx.TransportError) and _from_prefect(_request(error)):
            return f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(": ")
        elif isinstance(error, RuntimeError) and EPHEMERAL_TIMEOUT in str(error):
            return "the embedded server did not start in time"
    return None


def why_unreachable(exc: BaseException) -> str | None:
    """Why a run that raised `exc` should go on without Prefect, or None: `exc` is an API
    failure, or (not one of segpipe's own errors) the API fails its health check now. A
    run that already goes on without it (the child) never does again."""
    from pipeline.errors import SegpipeError

    if not may_fall_back():
        return None
    reason = api_failure(exc)
    if reason is None and not isinstance(exc, SegpipeError):  # a Crashed run's message, a lost result
        reason = failing_now()
    return reason


def failing_now() -> str | None:
    """The API's health check, asked once without retries: None when it answers, else why
    not. Asked when a run ended with failed images, whose errors are text by then."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
            failure = client.api_healthcheck()
    except Exception as exc:  # the embedded server gone and not starting again, among others
        failure = exc
    if failure is None:
        return None
    return api_failure(failure) or f"{type(failure).__name__}: {' '.join(str(failure).split())}"


WATCH_S = 2.0  # how often the watch asks the API's health while a run goes
PROBE_TIMEOUT_S = 10.0


@contextmanager
def watch_api() -> Iterator[None]:
    """While the block runs, ask the API's health every WATCH_S (a plain GET, no retries).
    Once it has failed for longer than the client's retries ride out (`retry_budget_s`),
    Prefect's client retries no more: each call still waiting fails at its next attempt,
    and the run unwinds to go on without the API. Without this, every later call of a
    run's teardown (states of the task, the subflow, the collection, each a few in a
    row) would wait the retries out again: minutes each."""
    if not may_fall_back():
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    health = f"{str(get_client(sync_client=True).api_url).rstrip('/')}/health"  # starts the embedded server
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(health, get_current_settings(), stop),
                               name="segpipe-api-watch", daemon=True)  # fmt: skip
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def retry_budget_s(retries: int, jitter: float) -> float:
    """How long one call of Prefect's client waits on a failing API at most: its backoff
    (2, 4, ... 2^retries s) at the jitter's upper end."""
    return sum(2.0**k for k in range(1, retries + 1)) * (1 + jitter)


def _watch(health: str, settings: Any, stop: threading.Event) -> None:
    failing_since = None
    budget = retry_budget_s(settings.client.max_retries, settings.client.retry_jitter_factor)
    while not stop.wait(WATCH_S):
        try:
            answered = httpx.get(health, timeout=PROBE_TIMEOUT_S).status_code not in RETRIED_CODES
        except httpx.HTTPError:
            answered = False
        now = time.monotonic()
        failing_since = None if answered else failing_since or now
        if failing_since is not None and now - failing_since > budget:
            # Prefect's client reads its retry count from these settings at every attempt
            # (one object its threads share): at 0, no call waits on the API any more
            log.warning("the Prefect API has not answered for %.0f s: no more retries", budget)
            settings.client.max_retries = 0
            return


def may_fall_back() -> bool:
    return not os.environ.get(FALLBACK_ENV)


def run_without_api(inputs: list[str], model: str, out: str, config: Any, concurrency: int,
                    verbose: bool) -> tuple[int, list[Any]]:  # fmt: skip
    """Run the collection again in a child process (flows/rerun.py) on a private embedded
    Prefect, and return (the child's exit code, the results of its run record)."""
    global _went_offline
    from flows.report import read_record

    _went_offline = True
    _quiet_prefect(verbose)
    _stop_ray()  # the child starts its own (or joins RAY_ADDRESS's cluster again)
    with tempfile.TemporaryDirectory(prefix="segpipe-prefect-") as home:
        spec = Path(home) / "run.pickle"
        spec.write_bytes(pickle.dumps({"inputs": inputs, "model": model, "out": out, "config": config,
                                       "concurrency": concurrency, "verbose": verbose}))  # fmt: skip
        code = subprocess.call([sys.executable, "-m", "flows.rerun", str(spec)], env=_private_env(home))
    return code, read_record(out) if code == 0 else []


def announcement(reason: str, out: str) -> str:
    """The one line a run that goes on without the API says."""
    from prefect.settings import PREFECT_API_URL

    from flows.report import record_location

    where = f"at {PREFECT_API_URL.value()}" if PREFECT_API_URL.value() else "(embedded server)"
    return f"Prefect API {where} unreachable ({reason}): the run goes on without it; results in {record_location(out)}"


def went_offline() -> bool:
    return _went_offline


def leave(code: int) -> None:
    """End this process with `code` once a run went on without the API: at interpreter
    exit Prefect's log and event workers would drain their queues to the dead API, each
    item retried with the client's backoff (minutes per item). The stores and the run
    record are closed by now; this process's Ray was stopped before the child started,
    and the reaper ends whatever else it started."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _private_env(home: str) -> dict[str, str]:
    """The child's environment: no API URL (so Prefect starts its embedded server), its
    own home and database, and the mark that it must not fall back again."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")}
    env |= {"PREFECT_HOME": home, FALLBACK_ENV: "1",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}  # fmt: skip
    return env


def _quiet_prefect(verbose: bool) -> None:
    """The dead API's workers log every item they cannot send: not on the terminal."""
    if verbose:
        return
    for name in list(logging.root.manager.loggerDict):
        if name == "prefect" or name.startswith("prefect."):
            logging.getLogger(name).disabled = True


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo += [error.__cause__, error.__context__, *getattr(error, "exceptions", ())]


def _request(error: httpx.TransportError) -> httpx.Request | None:
    try:
        return error.request
    except RuntimeError:  # raised without a request
        return None


def _from_prefect(request: httpx.Request | None) -> bool:
    """A request of Prefect's client (it names itself in the User-Agent: `prefect/3.x`)."""
    return request is not None and request.headers.get("user-agent", "").startswith("prefect/")
