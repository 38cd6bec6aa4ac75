"""The tile workers' shape: how many actors, with which resources, fitted per node (an actor
lives on one node: 2 nodes of 1 CPU cannot hold a 2-CPU actor). Pure but for
`plan_workers`, which inspects the cluster.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from pipeline.cluster.nodes import Cluster, Node, inspect, resources_text
from pipeline.config import RunConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CPU_THREADS_PER_WORKER = 4  # default CPU actor size: torch threads (and CPUs) per actor
# A run of small images (one tile each: an X-ray archive) takes a CPU slot per actor: each
# worker runs whole images (pipeline/whole_images.py), whose decoding and store writes are
# Python under one GIL per process, and a 256² forward pass gains little from more threads.
SMALL_IMAGE_CPUS = 1
RESOURCE_STEP = 1e-4  # Ray keeps resource amounts in units of 1/10000


# ---------------------------------------------------------------------------------------
# The tile workers' shape


@dataclass(frozen=True)
class WorkerShape:
    """How many tile actors to start and what each one asks Ray for."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int | None  # torch threads per actor; None: torch's default (GPU actors)

    def text(self) -> str:
        return resources_text(self.num_cpus, self.num_gpus)

    def places(self, node: Node) -> int:
        """How many of these actors the node (every node of a type) holds."""
        limits = [node.cpus / self.num_cpus] if self.num_cpus > 0 else []
        limits += [node.gpus / self.num_gpus] if self.num_gpus > 0 else []
        return (_whole(min(limits)) if limits else 1) * node.count


def plan_workers(config: RunConfig, small_images: bool = False) -> WorkerShape:
    """The tile workers' shape on the cluster this process is connected to."""
    cluster = inspect()
    if cluster.opaque and config.gpus_per_worker is None and not any(n.gpus for n in cluster.nodes):
        _warn_once("the Ray cluster has an autoscaler, whose node types Ray does not tell a driver, "
                   "and no GPU node now: tile workers start as CPU workers; give --gpus-per-worker 1 "
                   "if its worker nodes have GPUs")  # fmt: skip
    return worker_shape(cluster, config.workers, config.gpus_per_worker, config.cpus_per_worker,
                        CPU_THREADS_PER_WORKER if not small_images else SMALL_IMAGE_CPUS)  # fmt: skip


def worker_shape(cluster: Cluster, workers: int | None = None, gpus: float | None = None,
                 cpus: float | None = None, size: int = CPU_THREADS_PER_WORKER) -> WorkerShape:  # fmt: skip
    """GPU actors where the cluster has or may add GPU nodes (or ``gpus`` > 0 asks), else
    CPU actors. ``workers`` sets the count (default: as many as the nodes, and the node
    types an autoscaler reported, hold), ``gpus`` and ``cpus`` what each asks for. A shape
    that no node fits is a ConfigError naming both, unless an autoscaler of unreported node
    types may add one (then workers.PlacementWatch waits for it)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers=}")
    use_gpus = gpus > 0 if gpus is not None else any(n.gpus > 0 for n in cluster.nodes)
    shape = _gpu_shape(cluster, workers, gpus, cpus) if use_gpus else _cpu_shape(cluster, workers, cpus, size)
    if not any(shape.places(n) for n in cluster.nodes):
        if not cluster.opaque:
            raise ConfigError(f"a tile worker asking {shape.text()} fits no node of the Ray cluster "
                              f"({cluster.text()}): lower --cpus-per-worker / --gpus-per-worker, or "
                              f"add a node that has them")  # fmt: skip
        _warn_once(f"no node of the Ray cluster holds a tile worker asking {shape.text()} now "
                   f"({cluster.text()}); waiting for its autoscaler to add one")  # fmt: skip
    count = workers or max(1, sum(shape.places(n) for n in cluster.nodes))
    return replace(shape, count=count)


def _gpu_shape(cluster: Cluster, workers: int | None, gpus: float | None, cpus: float | None) -> WorkerShape:
    """One CPU feeds a GPU; a whole GPU each, or a share when ``workers`` asks for more
    actors than there are GPUs."""
    num_cpus = cpus if cpus is not None else 1.0
    if gpus is None:
        hosts = [n for n in cluster.nodes if n.gpus > 0 and n.cpus >= num_cpus]
        gpus = _share([(n.gpus, n.count) for n in hosts], workers, cap=1.0)
    return WorkerShape(1, num_cpus=num_cpus, num_gpus=gpus, threads=None)


def _cpu_shape(cluster: Cluster, workers: int | None, cpus: float | None, size: int) -> WorkerShape:
    """`size` CPUs each, or the largest node split into such actors (a 6-CPU node, size 4:
    one of 6); with ``workers``, the largest share of which that many fit."""
    largest = max((n.cpus for n in cluster.nodes), default=0.0)
    if cpus is None and workers is None:
        cpus = _default_cpus(largest, size)
    elif cpus is None:
        cpus = _share([(n.cpus, n.count) for n in cluster.nodes], workers, cap=largest or size)
    return WorkerShape(1, num_cpus=cpus, num_gpus=0.0, threads=max(1, int(cpus)))


def _default_cpus(largest: float, size: int) -> float:
    if largest <= 0:  # no CPU anywhere yet: the default size, for an autoscaler to add
        return float(size)
    if largest < 1:
        return largest
    return float(largest // max(1, int(largest // size)))


def _share(capacity: list[tuple[float, int]], count: int | None, cap: float) -> float:
    """The largest amount <= cap of which `count` fit on these nodes ((amount, nodes) pairs)
    together, each node holding whole shares; cap when `count` is None or nothing is there."""
    amounts = [a for a, n in capacity if a > 0 for _ in range(min(n, count or 0))]
    if count is None or not amounts:
        return cap
    candidates = {_round_down(min(cap, a / k)) for a in amounts for k in range(1, count + 1)}
    for share in sorted(candidates, reverse=True):
        if share > 0 and sum(_whole(a / share) for a in amounts) >= count:
            return share
    return _round_down(max(amounts) / count)


def _round_down(amount: float) -> float:
    """Down to Ray's resolution, so that k shares of a node's amount/k fit it again."""
    return round(math.floor(amount / RESOURCE_STEP + 1e-6) * RESOURCE_STEP, 4)


def _whole(x: float) -> int:
    return math.floor(x + 1e-9)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """connect and the pool's start both plan the workers: say a warning once a process."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


