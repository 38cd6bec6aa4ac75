"""A real Prefect server on loopback, and a proxy in front of it that can be made to fail.

`PrefectServer` is `prefect server start` with its own database; `ApiProxy` forwards TCP to
it and can be switched to answer every request 503 or to refuse connections, for a while
or for good: the failures a loaded or vanished API gives a run, without mocking Prefect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """End a process group we started (never by name), return its exit code."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait()
    return process.returncode


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own database, which can be stopped
    and started again on the same port and database (an API going away for a while)."""

    def __init__(self, home: Path, port: int | None = None):
        self.home, self.port = home, port or free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.log_path = home / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home}/prefect.db",
            # the scheduler looks for new deployments every 5 s; its full loop every 5 s here
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_UI_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"Prefect server did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ApiProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port), in one of three modes:
    "pass" forwards; "503" answers every request 503 Service Unavailable (the embedded
    server's answer when its SQLite is locked); "refuse" closes its listening socket, so
    connections are refused (a server that went away). Switching drops the connections
    already open, as a server that stops does."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.mode = "pass"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._listen()

    def set(self, mode: str) -> None:
        assert mode in ("pass", "503", "refuse"), mode
        with self._lock:
            self.mode = mode
            for s in self._open:  # a server that stops or fails drops its connections
                _close(s)
            self._open.clear()
        if mode == "refuse":
            if self._listener is not None:
                _close(self._listener)
                self._listener = None
        elif self._listener is None:
            self._listen()

    def close(self) -> None:
        self.set("refuse")

    def __enter__(self) -> ApiProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: refusing from now on
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.mode == "503":
            try:
                client.recv(65536)
                client.sendall(UNAVAILABLE)
            except OSError:
                pass
            _close(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._open |= {client, upstream}
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _close(source)
    _close(sink)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
