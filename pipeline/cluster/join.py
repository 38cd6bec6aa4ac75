"""Joining the Ray cluster the config or RAY_ADDRESS names, else starting a local one; a
wrong address or a refused token is one ClusterError within seconds, naming the address
and the likely cause.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import ray

import pipeline
from pipeline.cluster.shape import WorkerShape, plan_workers
from pipeline.config import RunConfig
from pipeline.errors import ClusterError

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 5.0  # a head that takes no TCP connection in this time is not there
PROBE_TIMEOUT_S = 10.0  # the Ray Client ping that tells a refused token


# ---------------------------------------------------------------------------------------
# Joining


def connect(config: RunConfig, small_images: bool = False) -> WorkerShape:
    """Join the cluster at ``config.ray_address`` or RAY_ADDRESS ("auto", "ray://host:10001",
    "host:6379"), else start a local one with this machine's CPUs and GPUs; then plan the
    tile workers (`plan_workers`), so a shape no node can hold fails before any image
    starts. A Ray already initialised in this process (a notebook, a test session) is used
    as it is."""
    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            ray.init(log_to_driver=_log_to_driver())
        else:
            join(address)
    route_cluster_messages(verbose=_log_to_driver())
    return plan_workers(config, small_images)


def route_cluster_messages(verbose: bool) -> None:
    """Keep what the cluster publishes off stdout, which belongs to the results (--json).

    A Ray driver prints the errors the cluster publishes (a worker died, a dying node's
    ~40 lines of raylet state) to stdout from a thread of its own, whatever log_to_driver
    says, and offers no hook for it (Ray 2.60: `listen_error_messages` calls
    `ray._private.worker.print_to_stdstream` by its module name). That name is rebound
    here: these messages go to stderr with -v and to this module's debug log without it
    (the run's own lines already say what a lost worker costs). Workers' own output, which
    log_to_driver copies only with -v, goes to stderr too."""
    from ray._private import worker as ray_worker

    printing = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)

    def route(data: dict[str, Any], ignore_prefix: bool) -> None:
        if verbose:
            printing({**data, "is_err": True}, ignore_prefix)
        elif data.get("pid") == "raylet":
            for line in data.get("lines", []):
                log.debug("from the cluster: %s", line)

    route.__wrapped__ = printing  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = route
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # log_to_driver's copy
        ignore = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(route, ignore_prefix=ignore))


def join(address: str) -> None:
    """ray.init(address), after checking within seconds that the address answers and takes
    this driver's token: Ray's own connect retries for 20 s (a refused token) to tens of
    minutes (nothing listening) and then says only ConnectionError."""
    target = _target(address)
    if target is not None:
        _check_reachable(address, *target)
        _check_accepted(address, *target)
    log.info("joining the Ray cluster at %s", address)
    for attempt in range(1, CLIENT_SERVER_ATTEMPTS + 1):
        try:
            ray.init(address=address, runtime_env=cluster_runtime_env(), log_to_driver=_log_to_driver())
            return
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            if CLIENT_SERVER_FAILED not in str(exc) or attempt == CLIENT_SERVER_ATTEMPTS:
                raise ClusterError(f"cannot join the Ray cluster at {address}: {last_line(exc)}") from exc
            # the head's Ray Client proxy starts one server process per driver; on a busy
            # head that start can miss the proxy's deadline, and the next one succeeds
            log.warning("the Ray cluster at %s did not start this driver's client server; trying again", address)
            ray.shutdown()
            time.sleep(CLIENT_SERVER_BACKOFF_S * attempt)


CLIENT_SERVER_FAILED = "Starting Ray client server failed"  # Ray's proxy, when that start failed
CLIENT_SERVER_ATTEMPTS = 3
CLIENT_SERVER_BACKOFF_S = 5.0


def cluster_runtime_env() -> dict[str, Any]:
    """The runtime_env for a cluster: this driver's ``pipeline`` package, so workers run
    the same code; dependencies come from the cluster's image (see pipeline.workers)."""
    return {"py_modules": [str(Path(pipeline.__file__).parent)]}


def _target(address: str) -> tuple[str, str, int] | None:
    """(kind, host, port) of a GCS ("host:port") or Ray Client ("ray://host[:port]")
    address; None for what Ray resolves itself ("auto", other schemes)."""
    scheme, sep, rest = address.rpartition("://")
    if address in ("auto", "local") or (sep and scheme != "ray"):
        return None
    host, colon, port = rest.rpartition(":")
    if sep and not colon:  # ray://head: the client server's default port
        host, port = rest, "10001"
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    return ("client" if sep else "gcs"), host.strip("[]"), int(port)


def _check_reachable(address: str, kind: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        why = (f"no answer in {REACH_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError)
               else f"unknown host {host}" if isinstance(exc, socket.gaierror)
               else exc.strerror or str(exc))  # fmt: skip
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({why}): is its head running and {port} "
            f"its {'client' if kind == 'client' else 'GCS'} port? From outside the cluster, open "
            f"the SSH tunnel or kubectl port-forward first (README: running on a cluster)"
        ) from exc


def _check_accepted(address: str, kind: str, host: str, port: int) -> None:
    """A ClusterError when the head refuses this driver's token (token authentication);
    any other answer is left to ray.init, which says more than a probe can."""
    try:
        refused = _client_refuses(host, port) if kind == "client" else _gcs_refuses(host, port)
    except Exception:  # the probe is a shortcut to a clear message, never a new failure
        log.debug("probing %s failed", address, exc_info=True)
        return
    if refused:
        raise ClusterError(f"the Ray cluster at {address} refused this driver: {_token_problem()}")


def _gcs_refuses(host: str, port: int) -> bool:
    from ray._common.network_utils import build_address
    from ray._raylet import GcsClient

    try:
        GcsClient(address=build_address(host, port))
    except ray.exceptions.AuthenticationError:
        return True
    return False


def _client_refuses(host: str, port: int) -> bool:
    import grpc
    from ray._common.network_utils import build_address
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    channel = init_grpc_channel(build_address(host, port))  # with this driver's token, if any
    try:
        ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
    return False


def _token_problem() -> str:
    """Why a head with token authentication refused this driver, and what to set."""
    fix = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
           "cluster's token (README: running on a cluster)")  # fmt: skip
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return f"it has token authentication on, and this driver sends no token (RAY_AUTH_MODE is not token): {fix}"
    try:
        from ray._raylet import AuthenticationTokenLoader

        has_token = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except Exception:
        has_token = True
    if not has_token:
        return f"it has token authentication on, and this driver has no token: {fix}"
    return f"it has token authentication on, and it rejected this driver's token: {fix}"


def last_line(exc: BaseException) -> str:
    """Ray's messages end with the cause (a creation task's error, the exit reason)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _log_to_driver() -> bool:
    """Whether workers' output (and a dying node's ~40 lines of raylet state) is copied to
    this process's terminal: not when the CLI runs quiet (RAY_LOG_TO_DRIVER=0, set by
    `segpipe` without -v); tile errors are recorded in the store either way."""
    return os.environ.get("RAY_LOG_TO_DRIVER", "1") != "0"
