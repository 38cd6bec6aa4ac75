"""Session-wide test settings: an isolated Prefect home, no analytics, real-data location."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports prefect, so no test touches the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="segpipe-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Library code logs outside flow runs in most tests; that is expected, not a warning.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

REAL_DATA = Path(
    os.environ.get("SEGPIPE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real images; tests using them skip when the folder is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (set SEGPIPE_REAL_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray of 2 CPUs, started once per session (a start takes seconds); yields its
    address, so a subprocess driver can join the same cluster."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite in the session's PREFECT_HOME) for the whole
    session: starting one takes ~15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained U-Net (3 in, 1 class, filters 4-8-16) saved as a checkpoint."""
    from pipeline import cards
    from pipeline.models import build_model, checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    model = build_model("unet", in_channels=3, classes=1, filters=[4, 8, 16])
    checkpoint.save(model, cards.ModelCard(arch="", config={}), path)
    return path


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained RGB U-Net whose card fixes its working size at 32² (as lung-xray's
    fixes 256²): with tile 32 every image plans one tile, so runs take the batch path."""
    import torch

    from pipeline import cards
    from pipeline.models import build_model, checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    model = build_model("unet", in_channels=3, classes=1, filters=[4, 8, 16])
    checkpoint.save(model, cards.ModelCard(arch="", config={}, scale={"size": [32, 32]}), path)
    return path


@pytest.fixture(scope="session")
def chest_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained grey U-Net (1 in, 1 class) whose card is for chest radiographs:
    the shipped lung model's modalities and selection rules."""
    from pipeline import cards
    from pipeline.models import build_model, checkpoint

    lung = cards.read_card(cards.resolve("lung-xray"))
    path = tmp_path_factory.mktemp("chest") / "chest.safetensors"
    model = build_model("unet", in_channels=1, classes=1, filters=[4, 8, 16])
    card = cards.ModelCard(arch="", config={}, name="chest", modalities=lung.modalities, selection=lung.selection)
    checkpoint.save(model, card, path)
    return path


# -- object storage: a real S3 server (moto) on loopback -----------------------------------------


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The address is fixed at import, before any fixture starts Ray: Ray's local workers keep the
# environment of the moment Ray started, and they write their tiles to the S3 outputs too.
# botocore (under s3fs) reads these variables, so the product code takes no test parameter;
# dummy credentials keep every test away from a real account.
S3_ENDPOINT = f"http://127.0.0.1:{_free_loopback_port()}"
os.environ.pop("AWS_PROFILE", None)
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ENDPOINT_URL_S3=S3_ENDPOINT, AWS_ACCESS_KEY_ID="segpipe-test",
    AWS_SECRET_ACCESS_KEY="segpipe-test", AWS_DEFAULT_REGION="us-east-1",
)  # fmt: skip


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on S3_ENDPOINT (127.0.0.1 only) for the session: real HTTP through
    s3fs and botocore, not a mocked client. Yields the endpoint URL."""
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = int(S3_ENDPOINT.rsplit(":", 1)[1])
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def flows_env(prefect_harness: None, ray_cluster: str) -> None:
    """Prefect (the session's temporary server) and Ray (local) for tests that run flows."""


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh Orthanc with DICOMweb for each test (it starts in well under a second), and
    its credentials in the environment a segpipe run reads them from; skipped where it
    cannot run (tests/orthanc.py says why)."""
    from tests.orthanc import Orthanc, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()
