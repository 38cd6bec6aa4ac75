"""A real Orthanc PACS with its DICOMweb plugin for the tests: a generated config, a
temporary storage folder, HTTP on a free loopback port, no DICOM (DIMSE) port, HTTP basic
authentication, started and stopped by its PID (never by name).

Orthanc 1.10 has no bind-address setting: its HTTP server listens on every interface
("RemoteAccessAllowed": false only refuses other hosts' requests). So it is started only
inside a network namespace that holds nothing but loopback (tests/isolated.sh makes one),
and the tests that need it skip, saying why, anywhere else.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

BINARY = "Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER = "segpipe"
START_TIMEOUT_S = 60


def unavailable() -> str | None:
    """Why Orthanc cannot run here (None: it can)."""
    if shutil.which(BINARY) is None or not PLUGIN.is_file():
        return f"Orthanc or its DICOMweb plugin ({PLUGIN}) is not installed (`make` installs both)"
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        return ("Orthanc 1.10 listens on every interface (it has no bind address): its tests run only in a "
                "loopback-only network namespace, as tests/isolated.sh makes (as root)")  # fmt: skip
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """One Orthanc server (restartable on the same port and storage)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.process: subprocess.Popen[bytes] | None = None
        config = {
            "Name": "segpipe-tests", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "storage"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: self.password},
            "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }  # fmt: skip
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def source(self) -> str:
        """The segpipe source of this PACS."""
        return f"dicomweb+{self.url}"

    def start(self) -> None:
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen([BINARY, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/system", auth=(USER, self.password), timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer in {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the process this object started, by its PID."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def client(self) -> Any:
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.auth = (USER, self.password)
        return DICOMwebClient(self.url, session=session)

    def upload(self, *datasets: Any) -> None:
        """STOW-RS, as a modality or another PACS would send them."""
        answer = self.client().store_instances(list(datasets))
        assert not answer.get("FailedSOPSequence"), answer

    def series(self, study: str | None = None, **filters: str) -> list[dict[str, Any]]:
        """QIDO-RS series (of `study`), with filters."""
        return self.client().search_for_series(study_instance_uid=study, search_filters=filters,
                                               fields=["SeriesDescription"])  # fmt: skip

    def env(self) -> dict[str, str]:
        """The environment a segpipe run needs for this PACS's credentials."""
        return {"SEGPIPE_DICOMWEB_USER": USER, "SEGPIPE_DICOMWEB_PASSWORD": self.password}
