"""What the cluster offers: the live nodes, and the node types an autoscaler may add
(`inspect` -> a Cluster); where the run's actors are (`actor_states`). What Ray 2.60
tells a driver about autoscaling is in the package docstring.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------
# What the cluster offers


@dataclass(frozen=True)
class Node:
    """A live node, or a node type an autoscaler may add: what one such node offers."""

    name: str  # a node id's first characters, or the type's name
    cpus: float
    gpus: float
    count: int = 1  # a live node: 1; a type: how many more the autoscaler may add
    live: bool = True

    def text(self) -> str:
        if self.live:
            return resources_text(self.cpus, self.gpus)
        return f"type {self.name} ({resources_text(self.cpus, self.gpus)}, up to {self.count} more)"


@dataclass(frozen=True)
class Cluster:
    """The nodes a tile worker may be placed on now, or once an autoscaler adds them."""

    nodes: tuple[Node, ...]
    autoscaler: bool = False  # an autoscaler may add nodes (of the types in `nodes`, if known)

    @property
    def opaque(self) -> bool:
        """An autoscaler may add nodes whose shape Ray did not tell (see the module docstring)."""
        return self.autoscaler and all(n.live for n in self.nodes)

    def text(self) -> str:
        """'2 nodes of CPU 1; 1 node of CPU 1, GPU 1; type gpu (CPU 8, GPU 1, up to 8 more)'."""
        live = Counter(n.text() for n in self.nodes if n.live)
        parts = [f"{k} node{'s' * (k > 1)} of {shape}" for shape, k in sorted(live.items())]
        parts += [n.text() for n in self.nodes if not n.live]
        if self.opaque:
            parts.append("an autoscaler of unreported node types")
        return "; ".join(parts) or "no nodes"


def inspect() -> Cluster:
    """The cluster this process is connected to."""
    return cluster_from_view(_on_cluster(_cluster_view))


def cluster_from_view(view: dict[str, Any]) -> Cluster:
    """A Cluster from `_cluster_view`'s plain data: live nodes, then the node types an
    autoscaler reported (a type counts as many nodes as it may still add)."""
    live = [Node(n["id"][:8], n["resources"].get("CPU", 0.0), n["resources"].get("GPU", 0.0))
            for n in view["nodes"] if n["alive"]]  # fmt: skip
    types = []
    for group in view["groups"]:
        cpus, gpus = group["resources"].get("CPU", 0.0), group["resources"].get("GPU", 0.0)
        present = sum((n.cpus, n.gpus) == (cpus, gpus) for n in live)  # Ray Data matches so too
        more = 1 if group["max"] < 0 else group["max"] - present  # -1: unbounded
        if more > 0:
            types.append(Node(group["name"], cpus, gpus, count=more, live=False))
    return Cluster(tuple(live + types), autoscaler=bool(types) or view["autoscaler"])


def _cluster_view() -> dict[str, Any]:
    """Nodes, reported node groups and whether an autoscaler runs, as plain data (this may
    run as a task on the cluster)."""
    nodes = ray.nodes()
    return {
        "nodes": [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in nodes],
        "groups": _node_groups(),
        "autoscaler": _v1_autoscaler([n["NodeID"] for n in nodes]) or _v2_autoscaler(),
    }


def _node_groups() -> list[dict[str, Any]]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: its absence means "not reported"
        log.debug("no cluster config from the GCS", exc_info=True)
        return []
    groups = config.node_group_configs if config is not None else []
    return [{"name": g.name, "resources": dict(g.resources), "max": g.max_count} for g in groups]


def _v1_autoscaler(node_ids: list[str]) -> bool:
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        return bool(raw) and real_autoscaler(json.loads(raw), node_ids)
    except Exception:
        log.debug("no v1 autoscaler status", exc_info=True)
        return False


def real_autoscaler(status: dict[str, Any], node_ids: list[str]) -> bool:
    """Whether a v1 autoscaler status report comes from an autoscaler that can add nodes.
    `ray start --head` without an autoscaling config runs the same monitor over a read-only
    provider whose node types are the nodes themselves, named "node_<node id>"."""
    report = status.get("autoscaler_report") or {}
    names = {*(report.get("active_nodes") or {}), *(report.get("pending_launches") or {}),
             *(report.get("node_type_mapping") or {}).values()}  # fmt: skip
    return bool(names - {f"node_{i}" for i in node_ids})


def _v2_autoscaler() -> bool:
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return str(status.stats.autoscaler_version or "0") != "0"  # 0: none ever reported
    except Exception:
        log.debug("no v2 autoscaler status", exc_info=True)
        return False


def _on_cluster(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) here, or as a zero-CPU task on the cluster over Ray Client, where
    this process has no GCS connection of its own."""
    if ray.util.client.ray.is_connected():
        return ray.get(ray.remote(num_cpus=0)(function).remote(*args))
    return function(*args)


# ---------------------------------------------------------------------------------------
# Waiting for placement


def actor_states(actor_ids: Sequence[str]) -> dict[str, str]:
    """The GCS state of each actor ("PENDING_CREATION", "ALIVE", ...) by its hex id."""
    return _on_cluster(_actor_states, list(actor_ids))


def _actor_states(actor_ids: list[str]) -> dict[str, str]:
    from ray._private import state

    states = {}
    for actor_id in actor_ids:
        try:
            states[actor_id] = state.actors(actor_id)["State"]
        except Exception:  # gone from the table: not waiting for a node
            log.debug("no state for actor %s", actor_id, exc_info=True)
    return states


def resources_text(cpus: float, gpus: float) -> str:
    text = f"CPU {cpus:g}"
    return f"{text}, GPU {gpus:g}" if gpus else text


