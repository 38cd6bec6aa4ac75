"""The cluster as a driver sees it: worker shapes fitted per node (and per node type an
autoscaler may add), actors that wait for a node, and joining errors that say why.

The multi-node tests run a real two-node Ray on loopback: a head of 1 CPU and a node of
1 CPU and one declared GPU (no CUDA here: placement is what is tested, and the GPU actor
runs its tiles on the CPU), with token authentication on. Where this machine allows a
network namespace (root: `unshare --net`), the cluster and its drivers live in one of
their own, holding only a loopback interface: Ray 2.60 binds its GCS, raylets and agents
to every interface of the node whatever --node-ip-address says, and there they reach
nothing else (and collide with no other Ray on the machine); elsewhere the cluster takes
free ports, its token the only guard. A second cluster has an autoscaler that adds a GPU
node from zero (the shipped configs' shape). Drivers run in subprocesses: this test
session already holds the in-process Ray of conftest's `ray_cluster`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

from pipeline import cluster, workers
from pipeline.cluster import (
    Cluster,
    Node,
    cluster_from_view,
    join,
    real_autoscaler,
    worker_shape,
)
from pipeline.config import RunConfig
from pipeline.errors import ClusterError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


# -- worker shapes, without Ray -----------------------------------------------------------


def nodes(*shapes: tuple[float, float], autoscaler: bool = False) -> Cluster:
    return Cluster(tuple(Node(f"n{i}", c, g) for i, (c, g) in enumerate(shapes)), autoscaler)


def test_a_cpu_worker_fits_the_largest_node_not_the_sum():
    shape = worker_shape(nodes((1, 0), (1, 0)))  # the issue's 2 nodes x 1 CPU: 2 actors of 1
    assert (shape.count, shape.num_cpus, shape.threads) == (2, 1, 1)
    shape = worker_shape(nodes((16, 0), (6, 0), (2, 0)))  # 4 of 4 CPUs: 4 + 1 + 0
    assert (shape.count, shape.num_cpus) == (5, 4)
    assert worker_shape(nodes((3, 0), (1, 0)), workers=2).num_cpus == 1.5  # both fit the 3-CPU node
    assert worker_shape(nodes((2, 0), (2, 0), (1, 0)), workers=3).num_cpus == 1  # 3 must fit at once
    assert worker_shape(nodes((2, 0)), workers=3).num_cpus == 0.6666  # rounded down: 3 fit


def test_gpus_where_a_node_or_a_reported_node_type_has_them():
    shape = worker_shape(nodes((1, 0), (1, 1)))
    assert (shape.count, shape.num_cpus, shape.num_gpus, shape.threads) == (1, 1, 1, None)
    scale_from_zero = Cluster((Node("head", 0, 0), Node("gpu", 8, 1, count=8, live=False)), True)
    shape = worker_shape(scale_from_zero)
    assert (shape.count, shape.num_gpus) == (8, 1)  # one per GPU the autoscaler may add
    assert worker_shape(nodes((8, 2)), gpus=0).num_gpus == 0  # CPU workers, when asked
    shape = worker_shape(nodes((8, 1)), gpus=0.5, cpus=2)
    assert (shape.count, shape.num_cpus, shape.num_gpus) == (2, 2, 0.5)


def test_a_shape_no_node_holds_is_an_error_naming_it_and_the_nodes():
    with pytest.raises(ConfigError) as info:
        worker_shape(nodes((1, 0), (1, 1)), cpus=64)
    message = str(info.value)
    assert "CPU 64" in message and "1 node of CPU 1; 1 node of CPU 1, GPU 1" in message
    with pytest.raises(ConfigError, match="GPU 1 fits no node"):
        worker_shape(nodes((4, 0)), gpus=1)


def test_an_autoscaler_of_unreported_node_types_is_waited_for(caplog):
    head_only = nodes((0, 0), autoscaler=True)  # the shipped configs: a head of 0 CPUs
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        shape = worker_shape(head_only, gpus=1)
    assert (shape.count, shape.num_cpus, shape.num_gpus) == (1, 1, 1)
    assert "waiting for its autoscaler" in caplog.text
    assert worker_shape(head_only).num_cpus == cluster.CPU_THREADS_PER_WORKER


def test_node_types_come_from_a_reported_cluster_config():
    view = {
        "nodes": [{"id": "a" * 56, "alive": True, "resources": {"CPU": 0.0}},
                  {"id": "b" * 56, "alive": True, "resources": {"CPU": 8.0, "GPU": 1.0}},
                  {"id": "c" * 56, "alive": False, "resources": {"CPU": 64.0}}],
        "groups": [{"name": "head", "resources": {}, "max": 1},
                   {"name": "gpu", "resources": {"CPU": 8, "GPU": 1}, "max": 4}],
        "autoscaler": False,
    }  # fmt: skip
    seen = cluster_from_view(view)
    assert [n.text() for n in seen.nodes] == ["CPU 0", "CPU 8, GPU 1", "type gpu (CPU 8, GPU 1, up to 3 more)"]
    assert seen.autoscaler and not seen.opaque
    assert worker_shape(seen).count == 4


def test_a_read_only_autoscaler_is_not_one():
    ids = ["ab12", "cd34"]
    readonly = {"autoscaler_report": {"active_nodes": {"node_ab12": 1, "node_cd34": 1}, "pending_launches": {}}}
    launcher = {"autoscaler_report": {"active_nodes": {"head": 1}, "pending_launches": {"gpu-worker": 2}}}
    assert not real_autoscaler(readonly, ids)
    assert real_autoscaler(launcher, ids)
    assert not real_autoscaler({}, ids)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_waiting_actors_are_reported_then_stop_the_run(monkeypatch, caplog):
    states = {"a1": "PENDING_CREATION", "a2": "PENDING_CREATION"}
    monkeypatch.setattr(workers, "actor_states", lambda ids: {i: states[i] for i in ids})
    monkeypatch.setattr(workers, "inspect", lambda: nodes((1, 0)))
    clock = _Clock()
    watch = workers.PlacementWatch(cluster.WorkerShape(2, 1, 1, None), timeout=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        watch.check(["a1", "a2"], up=0)
        assert not caplog.records  # nothing said in the first seconds
        clock.now = 10
        watch.check(["a1", "a2"], up=0)
        assert "2 of 2 tile workers wait for a node after 10 s (each asks CPU 1, GPU 1" in caplog.text
        clock.now = 60
        with pytest.raises(ClusterError, match="no tile worker was placed in 60 s: 2 wait for a node with CPU 1, GPU 1"):
            watch.check(["a1", "a2"], up=0)
        with pytest.raises(ClusterError):  # every later wait too: the run cannot go on
            watch.check(["a1", "a2"], up=0)


def test_a_run_with_some_workers_placed_goes_on_after_the_timeout(monkeypatch, caplog):
    states = {"a1": "ALIVE", "a2": "PENDING_CREATION"}
    monkeypatch.setattr(workers, "actor_states", lambda ids: {i: states[i] for i in ids})
    monkeypatch.setattr(workers, "inspect", lambda: nodes((1, 0)))
    clock = _Clock()
    watch = workers.PlacementWatch(cluster.WorkerShape(2, 1, 0, 1), timeout=5, clock=clock)
    clock.now = 5
    with caplog.at_level(logging.INFO, logger="pipeline"):
        watch.check(["a1", "a2"], up=0)  # a1 placed, loading its model
    assert "1 tile workers still wait for a node after 5 s; the run goes on with the 1 placed" in caplog.text
    clock.now = 100
    watch.check(["a2"], up=1)  # said once, then quiet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_nothing_answers_is_one_line_within_seconds(scheme):
    address = f"{scheme}127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterError) as info:
        join(address)  # probes first: nothing here touches this session's Ray
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message and address in message and "connection refused" in message.lower()
    with pytest.raises(ClusterError, match="is not host:port"):
        join("head-without-port")


def test_new_settings_are_checked():
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        RunConfig(gpus_per_worker=-1)
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        RunConfig(cpus_per_worker=0)
    with pytest.raises(ConfigError, match="placement_timeout"):
        RunConfig(placement_timeout=0)


@pytest.mark.slow  # the CLI's whole run path, on Prefect's test server
def test_the_cli_says_a_shape_no_node_holds_in_one_line_and_exits_2(prefect_harness, ray_cluster,
                                                                    tiny_checkpoint, tmp_path):  # fmt: skip
    from typer.testing import CliRunner

    from flows.cli import app

    image = tmp_path / "x.png"
    PILImage.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)

    result = CliRunner().invoke(app, ["run", str(image), "-m", str(tiny_checkpoint), "-o", str(tmp_path / "out"),
                                      "--tile", "32", "--cpus-per-worker", "64"])  # fmt: skip

    assert result.exit_code == 2, result.output
    said = [line for line in result.output.splitlines() if line.startswith("error:")]  # (and Prefect's log)
    assert len(said) == 1, result.output
    assert "ConfigError: a tile worker asking CPU 64 fits no node of the Ray cluster (1 node of CPU 2)" in said[0]


# -- a real two-node cluster on loopback ----------------------------------------------------


# An autoscaler that "launches" nodes as local raylets (Ray's fake multi-node provider,
# through the external-provider hook: the wheel lacks its defaults file): a head of 0 CPUs
# and a GPU node type scaled from zero, the shipped configs' shape.
FAKE_AUTOSCALING = {
    "cluster_name": "fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "provider": {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                             "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}},
    "head_node_type": "ray.head.default", "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                       "head_start_ray_commands", "worker_start_ray_commands")},
}  # fmt: skip


class LoopbackCluster:
    """A head (1 CPU) and a node (1 CPU, 1 declared GPU), or with `autoscaling` a head of
    0 CPUs whose autoscaler adds a node of 1 CPU and 1 GPU on demand; token auth on."""

    def __init__(self, root: Path, autoscaling: bool = False):
        self.root, self.autoscaling, self.token = root, autoscaling, secrets.token_hex(16)
        self.port, self.client_port = 6379, 10001
        self.prefix: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.netns = self._namespace()
        if self.netns is None:  # shared loopback: ports must be free ones
            self.port, self.client_port = free_port(), free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, token: str | None = "") -> dict[str, str]:
        """A driver's environment: the cluster's token, another one, or None (none)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PYTHONPATH=str(ROOT), RAY_DISABLE_USAGE_STATS="1")
        if token is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token or self.token)
        return env

    def start(self) -> None:
        head = ["--head", "--port", str(self.port), "--ray-client-server-port", str(self.client_port),
                "--include-dashboard", "false", "--dashboard-host", "127.0.0.1"]  # fmt: skip
        # Ray Client's server for a driver is a fresh Python importing Ray: on a loaded
        # machine it took over the proxy's 30 s to answer ("Starting Ray client server failed")
        slow = {"RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"}
        if not self.autoscaling:
            self._node("head", [*head, "--num-cpus", "1"], **slow)
            self._node("node", ["--address", self.address, "--num-cpus", "1", "--num-gpus", "1"])
            return
        config = self.root / "autoscaling.json"
        provider = {**FAKE_AUTOSCALING["provider"], "gcs_address": self.address}
        config.write_text(json.dumps({**FAKE_AUTOSCALING, "provider": provider}))
        self._node("head", [*head, "--num-cpus", "0", f"--autoscaling-config={config}"],
                   RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", **slow)  # fmt: skip

    def _node(self, name: str, args: list[str], **env: str) -> None:
        ports = [] if name == "head" else [  # the head has Ray's default ones
            f"--{flag}={port if self.netns is not None else free_port()}"
            for flag, port in (("dashboard-agent-listen-port", 52400), ("dashboard-agent-grpc-port", 52401),
                               ("runtime-env-agent-port", 52402), ("metrics-export-port", 52403))]  # fmt: skip
        log = self.root / f"{name}.log"
        command = [*self.prefix, RAY, "start", "--block", "--node-ip-address", "127.0.0.1",
                   "--temp-dir", str(self.root / "ray"), "--disable-usage-stats", *args, *ports]  # fmt: skip
        with open(log, "w") as out:
            self.procs.append(subprocess.Popen(command, env={**self.env(), **env}, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert self.procs[-1].poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    def _namespace(self) -> int | None:
        """A network namespace with only a loopback interface, held by a sleeping process."""
        if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
            return None
        holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 100000"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        time.sleep(0.3)
        if holder.poll() is not None or os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            holder.kill()
            holder.wait()
            return None
        self.procs.append(holder)
        self.prefix = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
        return holder.pid

    def drive(self, script: str, *args: Any, token: str | None = "", timeout: float = 180) -> dict[str, Any]:
        """Run a driver script in the cluster's network; its last stdout line is JSON."""
        command = [*self.prefix, sys.executable, "-c", script, *map(str, args)]
        done = subprocess.run(command, env=self.env(token), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-4000:]
        # the driver's answer is its last JSON line: Ray may print autoscaler events after it
        return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])

    def stop(self) -> None:
        """Each process group this cluster started, the nodes first, then whatever is
        left in its namespace (only this cluster's processes live there); nothing else."""
        namespace = os.readlink(f"/proc/{self.netns}/ns/net") if self.netns is not None else None
        for proc in reversed(self.procs):
            if proc.pid != self.netns:
                _end_group(proc)
        if namespace is not None:
            for pid in _in_namespace(namespace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if proc.pid == self.netns:
                _end_group(proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _in_namespace(namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "net") == namespace:
                    pids.append(int(entry.name))
    return pids


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # `ray start --block` may hang on TERM
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _cluster(autoscaling: bool = False) -> Iterator[LoopbackCluster]:
    if shutil.which(RAY) is None:
        pytest.skip("no ray executable next to this Python")
    ray_cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="sp-ray-", dir="/tmp")), autoscaling)  # short: socket paths
    if autoscaling and ray_cluster.netns is None:
        ray_cluster.stop()
        pytest.skip("the fake autoscaler's nodes need a network namespace of their own (root: unshare --net)")
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def loopback() -> Iterator[LoopbackCluster]:
    yield from _cluster()


@pytest.fixture(scope="module")
def autoscaling() -> Iterator[LoopbackCluster]:
    yield from _cluster(autoscaling=True)


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("image") / "xray.png"
    PILImage.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
    return str(path)


RUN = """
import json, logging, sys, time
import ray
from pipeline import stages
from pipeline.cluster import plan_workers
from pipeline.config import RunConfig
from pipeline.workers import ray_pool
image, model, out, address, settings = sys.argv[1:6]
config = RunConfig(tile=128, precision="fp32", exports=(), ray_address=address, **json.loads(settings))
job = stages.ingest(image, model, config, out)
total = stages.plan(job, config)["total"]
with ray_pool(model, config) as pool:
    counts = stages.infer(job, config, pool)
    shape = plan_workers(config)
    def table():
        from ray._private import state
        job_id = ray.get_runtime_context().get_job_id()
        return [a["Address"]["NodeID"] for a in state.actors().values()
                if a["JobID"] == job_id and a["State"] == "ALIVE" and a["ActorClassName"] == "TileWorker"]
    from pipeline.cluster.nodes import _on_cluster
    deadline = time.monotonic() + 60  # a worker may still load its model: the run was short
    while len(placed := _on_cluster(table)) < shape.count and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({"shape": [shape.count, shape.num_cpus, shape.num_gpus], "placed": placed, "nodes": nodes,
                  "done": counts["done"], "total": total, "state": stages.finalize(job)["state"]}))
"""


@pytest.mark.slow  # a second process: python, torch and an actor start
def test_a_gpu_node_gets_one_gpu_worker_per_gpu(loopback, tiny_checkpoint, xray, tmp_path):
    # over Ray Client, the README's way in: the cluster reads run as tasks there
    got = loopback.drive(RUN, xray, tiny_checkpoint, tmp_path, f"ray://127.0.0.1:{loopback.client_port}", "{}")

    assert got["shape"] == [1, 1.0, 1.0]
    gpu_nodes = [node for node, res in got["nodes"].items() if res.get("GPU")]
    assert got["placed"] == gpu_nodes  # one actor, on the GPU node
    assert got["done"] == got["total"] == 4 and got["state"] == "complete"  # torch ran it on the CPU


@pytest.mark.slow
def test_two_one_cpu_nodes_get_two_one_cpu_workers_and_the_run_completes(loopback, tiny_checkpoint, xray, tmp_path):
    got = loopback.drive(RUN, xray, tiny_checkpoint, tmp_path, loopback.address, '{"gpus_per_worker": 0}')

    assert got["shape"] == [2, 1.0, 0.0]  # not one actor of 2 CPUs, which no node has
    assert sorted(got["placed"]) == sorted(got["nodes"])  # one on each node
    assert got["done"] == got["total"] == 4 and got["state"] == "complete"


CONNECT = """
import json, sys, time
from pipeline.cluster import connect
from pipeline.config import RunConfig
from pipeline.errors import SegpipeError
start = time.monotonic()
try:
    shape = connect(RunConfig(ray_address=sys.argv[1], **json.loads(sys.argv[2])))
    said = f"shape {shape.count} x {shape.text()}"
except SegpipeError as exc:
    said = f"{type(exc).__name__}: {exc}"
print(json.dumps({"said": said, "seconds": time.monotonic() - start}))
"""


@pytest.mark.slow
def test_a_shape_no_node_holds_fails_within_seconds(loopback):
    got = loopback.drive(CONNECT, loopback.address, '{"cpus_per_worker": 64}')

    assert got["seconds"] < 15, got
    assert got["said"].startswith("ConfigError: a tile worker asking CPU 64, GPU 1 fits no node"), got
    assert "\n" not in got["said"]
    assert "1 node of CPU 1; 1 node of CPU 1, GPU 1" in got["said"]


@pytest.mark.slow
@pytest.mark.parametrize("via", ["gcs", "client"])
def test_a_driver_without_the_token_is_told_so_in_one_line(loopback, via):
    address = loopback.address if via == "gcs" else f"ray://127.0.0.1:{loopback.client_port}"

    none = loopback.drive(CONNECT, address, "{}", token=None)
    wrong = loopback.drive(CONNECT, address, "{}", token="0" * 32)

    for got in (none, wrong):
        assert got["seconds"] < 15, got  # Ray alone: 20 s (GCS) or 30 s (client), then a bare ConnectionError
        assert got["said"].startswith(f"ClusterError: the Ray cluster at {address} refused this driver"), got
        assert "RAY_AUTH_TOKEN" in got["said"] and "\n" not in got["said"]
    assert "sends no token (RAY_AUTH_MODE is not token)" in none["said"]
    assert "rejected this driver's token" in wrong["said"]


WATCH = """
import json, logging, sys, time
import ray
from pipeline import workers
from pipeline.config import RunConfig
from pipeline.errors import ClusterError
from pipeline.job import TileReport, TileStatus
said_before = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: said_before.append(record.getMessage())
logging.getLogger("pipeline").addHandler(handler)

class Noop:
    def __init__(self, model_path, config):
        pass

workers.PLACEMENT_FIRST_S = 1.0
config = RunConfig(ray_address=sys.argv[1], gpus_per_worker=1, placement_timeout=4)
workers.connect(config)
blocker = ray.remote(num_cpus=0, num_gpus=1)(type("Blocker", (), {"ping": lambda self: 1})).remote()
ray.get(blocker.ping.remote())  # the only GPU is taken: the tile worker waits for a node
start = time.monotonic()
backend = workers.RayBackend.start("unused", config, runner=Noop)
try:
    while True:
        backend.wait(0.1)
except ClusterError as exc:
    said = str(exc)
print(json.dumps({"said": said, "before": said_before, "seconds": time.monotonic() - start}))
"""


@pytest.mark.slow
def test_workers_waiting_for_a_node_are_reported_then_stop_the_run(loopback):
    got = loopback.drive(WATCH, loopback.address)

    assert 4 <= got["seconds"] < 15, got
    assert any("1 of 1 tile workers wait for a node after 1 s (each asks CPU 1, GPU 1" in m for m in got["before"])
    assert got["said"].startswith("no tile worker was placed in 4 s: 1 wait for a node with CPU 1, GPU 1")


# -- the shipped cluster configs ------------------------------------------------------------

DEPLOY = ROOT / "deploy"
# What the commands run inside a node's container may call: the image's programs
# (deploy/Containerfile: the venv's ray and segpipe, uv, wget, rsync, ssh) and shell builtins.
IMAGE_PROGRAMS = {"ray", "segpipe", "python", "uv", "wget", "rsync", "ssh", "ulimit", "export", "cd", "true"}


def _ray_version() -> str:
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    return pins["ray"].strip()


def test_the_ray_up_config_runs_only_what_the_image_has_and_binds_no_wildcard():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text()))  # Ray's defaults merged
    validate_config(config)

    in_container = [*config["head_setup_commands"], *config["worker_setup_commands"],
                    *config["head_start_ray_commands"], *config["worker_start_ray_commands"]]  # fmt: skip
    called = {part.split()[0] for command in in_container for part in re.split(r"&&|\|\||;|\|", command) if part.strip()}
    assert called <= IMAGE_PROGRAMS, called  # Ray's AWS defaults `pip install` boto3; the venv has no pip
    image = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"uv pip install -c constraints.txt .* boto3", image)  # the head's AWS node provider
    assert "rsync" in image and "openssh-client" in image  # the launcher's file sync, the autoscaler's ssh
    assert "0.0.0.0" not in json.dumps(config)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token: never a file here


def test_the_kuberay_config_binds_no_wildcard_and_takes_the_token_from_a_secret():
    import yaml

    docs = list(yaml.safe_load_all((DEPLOY / "raycluster.yaml").read_text()))
    spec = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
    head = spec["headGroupSpec"]

    assert "0.0.0.0" not in json.dumps(docs)
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1" and head["serviceType"] == "ClusterIP"
    assert spec["rayVersion"] == _ray_version()
    containers = [*head["template"]["spec"]["containers"],
                  *(c for group in spec["workerGroupSpecs"] for c in group["template"]["spec"]["containers"])]  # fmt: skip
    for env in [c["env"] for c in containers] + [spec["autoscalerOptions"]["env"]]:
        named = {e["name"]: e for e in env}
        assert named["RAY_AUTH_MODE"]["value"] == "token"
        assert "value" not in named["RAY_AUTH_TOKEN"]  # never the token itself
        assert named["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "segpipe-ray-token", "key": "auth_token"}
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"ray.io/cluster": "segpipe"}}


AUTOSCALE = """
import json, logging, sys
import ray
from pipeline import stages, workers
from pipeline.config import RunConfig
said = []
handler = logging.Handler(logging.INFO)
handler.emit = lambda record: said.append(record.getMessage())
logging.getLogger("pipeline").addHandler(handler)
logging.getLogger("pipeline").setLevel(logging.INFO)
workers.PLACEMENT_FIRST_S = 1.0
image, model, out, address = sys.argv[1:5]
config = RunConfig(tile=128, precision="fp32", exports=(), ray_address=address)
default = workers.connect(config)
config = config.with_(gpus_per_worker=1)
job = stages.ingest(image, model, config, out)
total = stages.plan(job, config)["total"]
with workers.ray_pool(model, config) as pool:
    counts = stages.infer(job, config, pool)
gpus = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]]
print(json.dumps({"default": [default.count, default.num_cpus, default.num_gpus], "said": said, "gpus": gpus,
                  "done": counts["done"], "total": total}))
"""


@pytest.mark.slow  # a head, an autoscaler, a node it adds, a driver and an actor
def test_an_autoscaling_cluster_adds_a_gpu_node_for_the_workers_asked_for(autoscaling, tiny_checkpoint, xray, tmp_path):
    got = autoscaling.drive(AUTOSCALE, xray, tiny_checkpoint, tmp_path, autoscaling.address)

    said = "\n".join(got["said"])
    assert got["default"] == [1, 4.0, 0.0]  # no GPU seen, none asked for: CPU workers, and a word
    assert "has an autoscaler, whose node types Ray does not tell a driver" in said
    assert "no node of the Ray cluster holds a tile worker asking CPU 1, GPU 1 now" in said
    assert "1 of 1 tile workers wait for a node after 1 s (each asks CPU 1, GPU 1" in said
    assert sorted(got["gpus"]) == [0, 1]  # the autoscaler added the GPU node
    assert got["done"] == got["total"] == 4


# -- a node dying mid-run --------------------------------------------------------------------


@pytest.fixture
def expendable() -> Iterator[LoopbackCluster]:
    """A two-node cluster of its own: the test kills its node."""
    yield from _cluster()


def _tiles_done(out: Path) -> int:
    from pipeline.job import TileStatus
    from pipeline.store import OutputStore

    stores = list(out.glob("*.zarr"))
    if not stores:
        return 0
    with contextlib.suppress(Exception):  # created but not yet written: not yet
        return int((OutputStore.open(stores[0]).status_grid() == TileStatus.DONE).sum())
    return 0


@pytest.mark.slow  # a cluster of its own, the CLI's whole run, a node killed under it
def test_a_node_dying_mid_run_costs_no_tile_and_leaves_json_stdout_clean(expendable, tiny_checkpoint, tmp_path):
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    command = [*expendable.prefix, sys.executable, "-m", "flows.cli", "run", str(image), "-m", str(tiny_checkpoint),
               "-o", str(out), "--tile", "32", "--export", "none", "--json", "--gpus-per-worker", "0",
               "--ray-address", expendable.address]  # fmt: skip
    env = {k: v for k, v in expendable.env().items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while _tiles_done(out) < 16:  # both workers run tiles by now
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
            time.sleep(0.1)
        node = expendable.procs[-1]  # ours, by PID: `ray start --block` with its raylet, agents and worker
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    assert driver.returncode == 0, stderr[-3000:]
    [result] = json.loads(stdout)  # stdout is the results, and nothing else
    assert result["state"] == "complete" and result["counts"]["done"] == 32 * 32
    assert "raylet" not in stderr and "A worker died" not in stderr, stderr[-3000:]  # no -v: none of Ray's dump
