"""Ray execution: tile workers as actors, and the scheduler's backend over them.

    connect        (pipeline.cluster) join the cluster, or start a local one, and plan
                   the workers' shape per node (pipeline.cluster.worker_shape)
    TileWorker     the actor: one TileRunner, so the model is loaded once per actor
    RayBackend     scheduler.Backend over a pool of actors: a bounded number of tiles in
                   flight per actor, results by ray.wait, a dead actor's tiles as WorkerLost;
                   actors still waiting for a node are reported (PlacementWatch)
    ray_pool       the run's pool of actors, started on first use; stages.infer leases it

No pixel data goes through the driver or the object store: a call carries an ImageJob, a
Tile and the attempt number; the actor reads the tile + halo from the working-level array,
writes the tile's own chunks and returns a TileReport.

A run over many images keeps one pool, so the model stays loaded between images:
``with ray_pool(model, config) as pool:`` then, per image, ``stages.infer(job, config, pool)``.

Cluster use: the workers need the same code and the same storage as the driver. `connect`
ships the ``pipeline`` package to the cluster (runtime_env py_modules) when it joins one;
third-party dependencies (torch, zarr, ...) come from the cluster's container image
(deploy/), not from pip at start-up, which would download torch on every node. Paths in
the ImageJob and the checkpoint must be reachable from every node: a shared filesystem,
or fsspec URLs (s3://...; the checkpoint is copied to a local temporary file per actor).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import ray
import ray.exceptions as rx

from pipeline.cluster import WorkerShape, actor_states, connect, inspect, last_line
from pipeline.config import RunConfig
from pipeline.engine import process_env
from pipeline.engine.pool import RunPool
from pipeline.engine.scheduler import Runner, ThreadBackend, WorkerLost
from pipeline.engine.tiling import Tile
from pipeline.errors import CheckpointError, ClusterError, SegpipeError, portable
from pipeline.image_stages import (
    BatchItem,
    BatchOutcome,
    Fingerprint,
    segment_in_worker,
)
from pipeline.io import location
from pipeline.job import ImageJob, TileReport

log = logging.getLogger(__name__)

ACTOR_THREADS = 2  # calls run at once in an actor: one reads/writes while the other computes
IN_FLIGHT_PER_ACTOR = 8  # tiles given to one actor at a time (backpressure; no pixels held)
# Tiles per call: a full actor's tiles make one batch per thread, so both threads work.
BATCH_MAX = IN_FLIGHT_PER_ACTOR // ACTOR_THREADS
MAX_RESTARTS = 4  # lives of an actor after the first; then it is retired
PROBE_INTERVAL_S = 0.25  # how often a restarting actor is asked whether it is back
PLACEMENT_FIRST_S = 10.0  # first word on tile workers that are not up yet
PLACEMENT_EVERY_S = 30.0  # then this often while some still wait
PENDING = frozenset({"DEPENDENCIES_UNREADY", "PENDING_CREATION"})  # GCS states before a node

# Errors that mean the process running a call is gone, not that the tile is bad: the
# tile goes back to the scheduler as WorkerLost. ActorUnavailableError (a subclass of
# RayActorError) is what in-flight calls of a restarting actor raise.
LOST_ERRORS: tuple[type[BaseException], ...] = (
    rx.RayActorError,
    rx.WorkerCrashedError,
    rx.NodeDiedError,
    rx.ObjectLostError,
    rx.LocalRayletDiedError,
)


# What builds a TileWorker's runner (default: engine.runner.TileRunner; benchmarks pass a no-op)
RunnerFactory = Callable[[str, RunConfig], Runner]


# ---------------------------------------------------------------------------------------
# The actor


class TileWorker:
    """A tile actor's body: loads the model once and runs tiles of any image with it."""

    def __init__(self, model_path: str, config: RunConfig, threads: int | None,
                 runner: RunnerFactory | None = None):  # fmt: skip
        # torch and the model's engine load in the actor, never in the driver
        import torch

        from pipeline.engine.runner import TileRunner

        if threads is not None:
            torch.set_num_threads(threads)
        with local_checkpoint(model_path) as path:
            self.runner = (runner or TileRunner)(path, config)
        # whole images' tiles (segment_image) run on this actor's model, in this process
        self.pool = RunPool(lambda: ThreadBackend(self.runner, threads=1))

    def run(self, job: ImageJob, batch: list[tuple[Tile, int]]) -> list[TileReport | BaseException]:
        """Compute and write (tile, attempt) pairs one after another; a tile's exception
        comes back in its place, so one bad tile does not fail the others of its batch."""
        return [self._run_one(job, tile, attempt) for tile, attempt in batch]

    def _run_one(self, job: ImageJob, tile: Tile, attempt: int) -> TileReport | BaseException:
        try:
            return self.runner.run(job, tile, attempt)
        except Exception as exc:
            log.warning("%s: tile %s attempt %d failed", job.image_id, tile.index, attempt, exc_info=True)
            return portable(exc)

    def segment_image(self, item: BatchItem, seen: Fingerprint, model_path: str, config: RunConfig,
                      out: str) -> BatchOutcome | None:  # fmt: skip
        """A whole small image, every stage here (`pipeline.whole_images`)."""
        return segment_in_worker(item, seen, model_path, config, out, self.pool)

    def ping(self) -> bool:
        """Answers once the actor (and its model) is up."""
        return True


# The one place TileWorker becomes a Ray actor; resources are set where actors start.
RemoteTileWorker = ray.remote(max_concurrency=ACTOR_THREADS, max_restarts=MAX_RESTARTS)(TileWorker)


@contextmanager
def local_checkpoint(model_path: str) -> Iterator[str]:
    """A local file for a checkpoint path, or for an fsspec URL a temporary copy that
    lives while the model loads (the name is kept: the loader goes by its suffix)."""
    if not location.is_remote(model_path):
        yield str(location.local_path(model_path))
        return
    with tempfile.TemporaryDirectory(prefix="segpipe-model-") as tmp:
        local = Path(tmp) / PurePosixPath(model_path.split("://", 1)[1]).name
        try:
            with fsspec.open(model_path, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, ValueError, ImportError) as exc:
            raise CheckpointError(f"{model_path}: cannot fetch the checkpoint ({exc})") from exc
        yield str(local)


# ---------------------------------------------------------------------------------------
# The backend


@dataclass
class _Actor:
    handle: Any
    load: int = 0  # tiles in flight on it, sent or still in its outbox
    ready: bool = False  # answered a ping since it (re)started
    started: bool = False  # answered once: placed on a node and its model loaded
    retired: bool = False  # dead for good: restarts used up, or its start failed
    probe_at: float = 0.0  # when to ping it next (while not ready)
    outbox: list[tuple[int, ImageJob, Tile, int]] = field(default_factory=list)  # key, job, tile, attempt


class RayBackend:
    """The scheduler's Backend over TileWorker actors. Each actor holds at most
    IN_FLIGHT_PER_ACTOR tiles, so ``slots`` counts only actors that are up. Tiles
    submitted together go to an actor in one call (at most BATCH_MAX tiles): fast tiles
    then cost one Ray call per batch, not per tile. An actor that dies hands its tiles
    back as WorkerLost and gets none until a ping says it restarted; one that cannot come
    back is retired."""

    def __init__(self, actors: list[Any], watch: PlacementWatch | None = None):
        if not actors:
            raise SegpipeError("RayBackend needs at least one actor")
        self._actors = [_Actor(a) for a in actors]
        self._watch = watch
        self._keys = itertools.count()
        self._calls: dict[Any, tuple[int, list[int]]] = {}  # ObjectRef -> actor number, tile keys
        self._probes: dict[Any, int] = {}  # ObjectRef -> actor number
        self._last_death = ""

    @classmethod
    def start(cls, model_path: str, config: RunConfig, runner: RunnerFactory | None = None,
              small_images: bool = False) -> RayBackend:  # fmt: skip
        """Connect (see `cluster.connect`) and start the actors its shape asks for (CPU
        actors of one CPU each for `small_images`: see `cluster.shape`); until they are
        placed, a PlacementWatch reports them."""
        shape = connect(config, small_images)
        log.info("starting %d tile workers (%s each, %s torch threads)",
                 shape.count, shape.text(), shape.threads or "default")  # fmt: skip
        options = RemoteTileWorker.options(num_cpus=shape.num_cpus, num_gpus=shape.num_gpus,
                                           runtime_env={"env_vars": process_env.worker_env()})
        actors = [options.remote(model_path, config, shape.threads, runner) for _ in range(shape.count)]
        return cls(actors, PlacementWatch(shape, config.placement_timeout))

    @property
    def slots(self) -> int:
        return IN_FLIGHT_PER_ACTOR * sum(a.ready for a in self._actors)

    def image_workers(self) -> list[Any]:
        """The actors that are up, for whole images (`pipeline.whole_images`); the others
        are probed on the way, without waiting (actors start at their own pace)."""
        self._send_probes()
        if self._probes:
            ready, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=0)
            for ref in ready:
                self._settle_probe(ref)
        return [a.handle for a in self._actors if a.ready]

    def submit(self, job: ImageJob, tile: Tile, attempt: int) -> Hashable:
        """Give the tile to the least loaded actor that is up; it is sent at the next wait."""
        actor = min((a for a in self._actors if a.ready), key=lambda a: a.load)
        key = next(self._keys)
        actor.outbox.append((key, job, tile, attempt))
        actor.load += 1
        return key

    def wait(self, timeout: float) -> list[tuple[Hashable, TileReport | BaseException]]:
        """Send what was submitted, then return finished tiles (probes of restarting
        actors are settled on the way)."""
        self._send_batches()
        self._send_probes()
        self._watch_placement()
        refs = [*self._calls, *self._probes]
        if not refs:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        finished: list[tuple[Hashable, TileReport | BaseException]] = []
        for ref in ready:
            if ref in self._probes:
                self._settle_probe(ref)
            else:
                finished += self._outcomes(ref)
        return finished

    def close(self) -> None:
        """Stop every actor (its model and open stores go with it)."""
        for actor in self._actors:
            ray.kill(actor.handle)

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send_batches(self) -> None:
        """One call per actor, image and BATCH_MAX tiles of its outbox."""
        for number, actor in enumerate(self._actors):
            by_image: dict[str, list[tuple[int, ImageJob, Tile, int]]] = {}
            for item in actor.outbox:
                by_image.setdefault(item[1].image_id, []).append(item)
            actor.outbox = []
            for items in by_image.values():
                for i in range(0, len(items), BATCH_MAX):
                    part = items[i : i + BATCH_MAX]
                    batch = [(tile, attempt) for _, _, tile, attempt in part]
                    self._calls[actor.handle.run.remote(part[0][1], batch)] = (number, [k for k, *_ in part])

    def _outcomes(self, ref: Any) -> list[tuple[int, TileReport | BaseException]]:
        number, keys = self._calls.pop(ref)
        self._actors[number].load -= len(keys)
        try:
            return list(zip(keys, ray.get(ref), strict=True))
        except LOST_ERRORS as exc:
            self._lost(number, exc)
            lost = WorkerLost(f"tile worker {number}: {last_line(exc)}")
            return [(key, lost) for key in keys]
        except rx.RayTaskError as exc:  # the call itself broke, not one of its tiles
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            return [(key, cause) for key in keys]
        except rx.RayError as exc:  # e.g. its arguments could not be unpickled there
            return [(key, exc) for key in keys]

    def _watch_placement(self) -> None:
        if self._watch is not None:
            waiting = [actor_id(a.handle) for a in self._actors if not (a.started or a.retired)]
            self._watch.check(waiting, up=sum(a.ready for a in self._actors))

    def _lost(self, number: int, exc: BaseException) -> None:
        actor = self._actors[number]
        if actor.ready:
            log.warning("tile worker %d lost (%s); waiting for its restart", number, last_line(exc))
            actor.ready, actor.probe_at = False, 0.0

    def _send_probes(self) -> None:
        now = time.monotonic()
        probing = set(self._probes.values())
        for number, actor in enumerate(self._actors):
            if not (actor.ready or actor.retired or number in probing) and actor.probe_at <= now:
                self._probes[actor.handle.ping.remote()] = number

    def _settle_probe(self, ref: Any) -> None:
        number = self._probes.pop(ref)
        actor = self._actors[number]
        try:
            ray.get(ref)
            actor.ready = actor.started = True
        except rx.ActorUnavailableError:  # restarting: ask again shortly
            actor.probe_at = time.monotonic() + PROBE_INTERVAL_S
        except LOST_ERRORS as exc:
            actor.retired, self._last_death = True, last_line(exc)
            log.error("tile worker %d is dead: %s", number, self._last_death)
            if all(a.retired for a in self._actors):
                raise SegpipeError(f"every tile worker died; the last said: {self._last_death}") from exc


def actor_id(handle: Any) -> str:
    return handle._actor_id.hex()  # an ActorHandle's ActorID, or Ray Client's ActorRef


class PlacementWatch:
    """Says how many tile workers wait for a node, and what they ask, while some do; stops
    the run when none was placed within `timeout` seconds. An autoscaler may take minutes
    to add a node, and a shape it cannot add would otherwise wait in silence forever."""

    def __init__(self, shape: WorkerShape, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.shape, self.timeout, self._clock = shape, timeout, clock
        self._start = clock()
        self._next = self._start + min(PLACEMENT_FIRST_S, timeout)
        self._done = False
        self._reported = False  # said that some wait: then say when all are up
        self._error: ClusterError | None = None

    def check(self, waiting: Sequence[str], up: int) -> None:
        """`waiting`: ids of the actors that never answered yet (and are not retired);
        `up`: how many answer. Cheap between reports: call it at every wait."""
        if self._error is not None:
            raise self._error
        if self._done:
            return
        now = self._clock()
        if not waiting:
            self._done = True
            if self._reported:
                log.info("all %d tile workers are up after %.0f s", up, now - self._start)
            return
        if now < self._next:
            return
        elapsed = now - self._start
        try:
            states = actor_states(waiting)
        except Exception:  # a report is worth no failure of the run: try again later
            log.debug("no actor states from the GCS", exc_info=True)
            self._next = now + PLACEMENT_EVERY_S
            return
        pending = sum(states.get(actor_id) in PENDING for actor_id in waiting)
        self._reported = True
        left = self._start + self.timeout - now  # check again at the timeout, if it comes first
        self._next = now + (min(PLACEMENT_EVERY_S, left) if left > 0 else PLACEMENT_EVERY_S)
        placed = up + len(waiting) - pending  # up, or on a node and loading the model
        if not pending:
            log.info("%d tile workers are starting (loading the model) after %.0f s", len(waiting), elapsed)
        elif elapsed < self.timeout:
            log.warning("%d of %d tile workers wait for a node after %.0f s (each asks %s; the cluster "
                        "now: %s); an autoscaler may be adding one (`ray status` on the head tells)",
                        pending, len(waiting) + up, elapsed, self.shape.text(), _cluster_text())  # fmt: skip
        elif placed:
            self._done = True
            log.warning("%d tile workers still wait for a node after %.0f s; the run goes on with the "
                        "%d placed", pending, elapsed, placed)  # fmt: skip
        else:
            self._error = ClusterError(
                f"no tile worker was placed in {self.timeout:g} s: {pending} wait for a node with "
                f"{self.shape.text()} (the cluster now: {_cluster_text()}); check the autoscaler "
                f"(`ray status` on the head) or raise --placement-timeout")  # fmt: skip
            raise self._error


def _cluster_text() -> str:
    try:
        return inspect().text()
    except Exception:
        log.debug("no cluster view", exc_info=True)
        return "unknown"


# ---------------------------------------------------------------------------------------
# The run's pool


def ray_pool(model_path: str, config: RunConfig, runner: RunnerFactory | None = None,
             small_images: bool = False) -> RunPool:  # fmt: skip
    """The run's worker pool on Ray: TileWorker actors started on its first lease (so a
    run with nothing to compute starts none), shared by the run's images, stopped when the
    pool closes. Pass it to `stages.infer` and `batch.segment_batch` (`small_images`: the
    run's images are one tile each, `batch.one_tile`)."""
    return RunPool(lambda: RayBackend.start(model_path, config, runner, small_images))
