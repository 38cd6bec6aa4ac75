"""Keeping Prefect's record true around a driver process: is the API there, and which runs
did a driver that died leave `Running`.

A driver killed with SIGKILL (the OOM killer, a node lost, `kill -9`) cannot tell Prefect
that its runs ended: they would stay Running forever, and automations and the UI would
never see the bad night. Each driver tags its runs with its host and process id
(`driver_tag`); the next driver on the same host marks the runs of drivers that no longer
exist Crashed (`mark_crashed_runs`). Runs of drivers on other hosts are left alone: from
here nothing can tell a live one from a dead one.
"""

from __future__ import annotations

import logging
import os
import socket

import httpx

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

TAG_PREFIX = "segpipe-driver:"
API_TIMEOUT_S = 10.0


def driver_tag() -> str:
    """This process's tag: `segpipe-driver:<host>:<pid>`."""
    return f"{TAG_PREFIX}{socket.gethostname()}:{os.getpid()}"


class ApiUnreachable(ConfigError):
    """The Prefect API at PREFECT_API_URL does not answer (`reason`, a few words): the run
    goes on without it (flows/offline.py)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_api() -> None:
    """With PREFECT_API_URL set, the server must answer its health check: else
    ApiUnreachable, or a ConfigError for a server that refuses this client (the embedded
    server needs no check: this process starts it)."""
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    headers = {"Authorization": f"Bearer {PREFECT_API_KEY.value()}"} if PREFECT_API_KEY.value() else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=API_TIMEOUT_S, headers=headers)
    except httpx.HTTPError as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise ApiUnreachable(f"cannot reach the Prefect API at {url} ({reason}); is the server running and "
                             "reachable from here? Unset PREFECT_API_URL to use the embedded one", reason) from None
    if response.status_code in (401, 403):
        raise ConfigError(f"the Prefect API at {url} refused this client ({response.status_code}): set "
                          "PREFECT_API_KEY (or PREFECT_API_AUTH_STRING) for it")  # fmt: skip
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise ApiUnreachable(f"the Prefect API at {url} answered {response.status_code} to its health check",
                             f"{response.status_code} {response.reason_phrase}".strip())
    if response.status_code >= 400:
        raise ConfigError(f"the Prefect API at {url} answered {response.status_code} to its health check")


def mark_crashed_runs() -> int:
    """Mark Crashed the Running flow runs of dead segpipe drivers on this host; returns
    how many. Best effort: a failure to ask is logged, never fatal."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host_prefix = f"{TAG_PREFIX}{socket.gethostname()}:"
    marked = 0
    try:
        with get_client(sync_client=True) as client:
            running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])),
                tags=FlowRunFilterTags(all_=["segpipe"]),
            ))  # fmt: skip
            for run in running:
                pid = _driver_pid(run.tags, host_prefix)
                if pid is None or _alive(pid):
                    continue
                message = f"its driver (process {pid} on this host) is gone"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked += 1
    except Exception as exc:  # the record is kept best effort: the run itself goes on
        log.warning("could not check for crashed runs: %s", exc)
    if marked:
        log.warning("marked %d runs of a driver that died Crashed", marked)
    return marked


def _driver_pid(tags: list[str], host_prefix: str) -> int | None:
    for tag in tags:
        if tag.startswith(host_prefix) and tag[len(host_prefix):].isdigit():
            return int(tag[len(host_prefix):])
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
