"""Prefect is never the reason a run fails: `segpipe run` against a real Prefect server
behind a loopback proxy that is made to fail mid-run (503 Service Unavailable, refused
connections), for a while and for good.

A short outage is ridden out by the client's retries, and Prefect keeps the whole record;
an API gone for good leaves the run to go on without it: exit 0, one line saying so, and
the stores and the run record complete.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest

from tests.prefect_fixtures import ApiProxy, PrefectServer, free_port, stop_process

slow = pytest.mark.slow  # a Prefect server, and runs of a few tiny images through it

IMAGES = 3
UNREACHABLE_LINE = "unreachable ("  # "Prefect API at URL unreachable (why): the run goes on without it; ..."


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrefectServer, ApiProxy]]:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    proxy = ApiProxy(("127.0.0.1", server.port))
    yield server, proxy
    proxy.close()
    server.stop()


# -- which errors are Prefect's: real errors of Prefect's client and of plain httpx ------------


def _prefect_client_error(api: str) -> Exception:
    """What Prefect's own client raises against `api`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    with temporary_settings({PREFECT_API_URL: api, PREFECT_CLIENT_MAX_RETRIES: 0}):
        with get_client(sync_client=True) as client:
            try:
                client.read_flows(limit=1)
            except Exception as exc:
                return exc
    raise AssertionError(f"{api} answered")


def test_errors_of_prefects_api_are_told_from_the_runs_own() -> None:
    from flows.offline import api_failure
    from flows.runs import ApiUnreachable
    from pipeline.errors import InputError

    refused = _prefect_client_error(f"http://127.0.0.1:{free_port()}/api")  # nothing listens there
    assert api_failure(refused).startswith("ConnectError")
    try:  # the same error deep in a flow's failure
        try:
            raise refused
        except Exception as inner:
            raise RuntimeError("segment-collection ended Crashed") from inner
    except RuntimeError as outer:
        assert api_failure(outer) == api_failure(refused)
    with ApiProxy(("127.0.0.1", free_port())) as proxy:  # a proxy answering 503
        proxy.set("503")
        assert api_failure(_prefect_client_error(proxy.api)) == "503 Service Unavailable"
    assert api_failure(ApiUnreachable("cannot reach ...", "ConnectError: refused")) == "ConnectError: refused"
    assert api_failure(RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server."))
    # not Prefect's: a PACS (plain httpx) that refuses, a bad input
    with pytest.raises(httpx.ConnectError) as pacs:
        httpx.get(f"http://127.0.0.1:{free_port()}/dicom-web/studies")
    assert api_failure(pacs.value) is None
    assert api_failure(InputError("x.png: not an image")) is None


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_watch_stops_the_retries_once_the_api_failed_longer_than_they_ride_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        PREFECT_CLIENT_RETRY_JITTER_FACTOR,
        temporary_settings,
    )

    from flows import offline

    assert offline.retry_budget_s(7, 0.2) == pytest.approx((2 + 4 + 8 + 16 + 32 + 64 + 128) * 1.2)
    monkeypatch.setattr(offline, "WATCH_S", 0.2)
    monkeypatch.delenv(offline.FALLBACK_ENV, raising=False)
    healthy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=healthy.serve_forever, daemon=True).start()
    retries = {PREFECT_CLIENT_MAX_RETRIES: 2, PREFECT_CLIENT_RETRY_JITTER_FACTOR: 0}  # a budget of 6 s
    with ApiProxy(healthy.server_address) as proxy, temporary_settings({PREFECT_API_URL: proxy.api, **retries}):
        with offline.watch_api():
            time.sleep(8)  # an API that answers: retries stay
            assert PREFECT_CLIENT_MAX_RETRIES.value() == 2
            proxy.set("503")
            deadline = time.monotonic() + 60
            while PREFECT_CLIENT_MAX_RETRIES.value() != 0:
                assert time.monotonic() < deadline, "retries never stopped"
                time.sleep(0.1)
    healthy.shutdown()


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(IMAGES):
        pixels = np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"x{i}.png")
    return folder


def _run_with_outage(api: ApiProxy, model: Path, root: Path, outage: Callable[[], None], concurrency: int = 1,
                     **settings: str) -> tuple[subprocess.CompletedProcess, Path]:  # fmt: skip
    """`segpipe run` on a few tiny images through the proxy; `outage` runs once the first
    output exists (the run is under way), then the proxy passes again."""
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env |= {"PREFECT_API_URL": api.api, "PREFECT_HOME": str(root / "client"), **settings}
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(_images(root / "in")), "-m", str(model),
                            "-o", str(out), "--tile", "32", "--export", "none", "--concurrency", str(concurrency), "--json"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.zarr")):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        outage()
        stdout, stderr = run.communicate(timeout=600)
    finally:
        stop_process(run, 9)
        api.set("pass")
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), out


def _flow_runs(server: PrefectServer, name: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [name]}}}
    return httpx.post(f"{server.api}/flow_runs/filter", json=body, timeout=30).json()


@slow
def test_a_short_outage_is_ridden_out_and_prefect_keeps_the_whole_record(
    api: tuple[PrefectServer, ApiProxy], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    server, proxy = api

    def outage() -> None:  # answering 503 for a while, then gone for a while
        proxy.set("503")
        time.sleep(5)
        proxy.set("refuse")
        time.sleep(5)
        proxy.set("pass")

    done, out = _run_with_outage(proxy, tiny_checkpoint, tmp_path, outage)

    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["state"] for r in json.loads(done.stdout)] == ["complete"] * IMAGES
    assert UNREACHABLE_LINE not in done.stderr  # ridden out, not gone around
    [collection] = _flow_runs(server, "segment-collection")
    assert collection["state_type"] == "COMPLETED", collection["state"]
    images = _flow_runs(server, "segment-image")
    assert sorted(r["state_type"] for r in images) == ["COMPLETED"] * IMAGES


@slow
def test_an_api_gone_for_good_leaves_the_run_to_go_on_without_it(
    api: tuple[PrefectServer, ApiProxy], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    _, proxy = api
    # two retries (2 + 4 s) instead of the CLI's seven (~4 min) keep the test short; two
    # images at once: the one the stopped run was still working on must not stay locked
    done, out = _run_with_outage(proxy, tiny_checkpoint, tmp_path, lambda: proxy.set("503"), concurrency=2,
                                 PREFECT_CLIENT_MAX_RETRIES="2")  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if UNREACHABLE_LINE in line]
    assert len(said) == 1, done.stderr[-3000:]
    assert "503" in said[0] and "segpipe-run.json" in said[0]
    assert [r["state"] for r in json.loads(done.stdout)] == ["complete"] * IMAGES
    record = json.loads((out / "segpipe-run.json").read_text())
    assert [r["state"] for r in record["images"]] == ["complete"] * IMAGES
    status = subprocess.run([sys.executable, "-m", "flows.cli", "status", str(out), "--json"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
    assert [s["state"] for s in json.loads(status.stdout)["images"]] == ["complete"] * IMAGES


OUTAGE_S = 70  # longer than Prefect's own retries wait (5 retries: 2 + 4 + ... + 32 = 62 s)


@slow
def test_a_run_rides_out_its_prefect_api_going_away_for_a_while(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The server itself stopped and started again (on its port and database), for longer
    than Prefect's default retries wait: the CLI's retries ride it out."""
    server = PrefectServer(tmp_path / "server")
    server.start()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PREFECT_API_URL=server.api, PREFECT_HOME=str(tmp_path / "client"))
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(_images(tmp_path / "in")), "-m", str(tiny_checkpoint),
                            "-o", str(out), "--tile", "32", "--export", "none", "--concurrency", "1", "--json"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*.zarr")):  # the run is under way
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        server.stop()
        time.sleep(OUTAGE_S)
        server.start()
        stdout, stderr = run.communicate(timeout=600)
    finally:
        stop_process(run, 9)
        server.stop()

    assert run.returncode == 0, stderr[-3000:]
    assert [r["state"] for r in json.loads(stdout)] == ["complete"] * IMAGES
    assert UNREACHABLE_LINE not in stderr
