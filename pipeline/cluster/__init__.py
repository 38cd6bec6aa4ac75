"""The Ray cluster as the driver sees it: joining it, what its nodes offer, and the shape of
tile workers that fits them.

    connect         join the cluster (or start a local one) and plan the tile workers;
                    a wrong address or a refused token is one ClusterError within seconds
    inspect         the live nodes, and the node types an autoscaler may add (a Cluster)
    worker_shape    how many actors, with which resources (pure: a Cluster in)
    actor_states    where the run's actors are: waiting for a node, or placed

Modules: join.py (connect, join), nodes.py (inspect, actor_states), shape.py
(worker_shape, plan_workers).

An actor lives on one node, so shapes are fitted per node, never to the cluster's sum
(2 nodes of 1 CPU cannot hold a 2-CPU actor).

What Ray 2.60 tells a driver about autoscaling (and what is used here):
- `ray.nodes()`: each live node's resources, but no node types.
- `ray._private.state.state.get_cluster_config()`: the autoscaler's node groups (resources,
  min/max count), the record Ray Data reads; present only when something reported it to
  the GCS. Ray 2.60's own autoscalers (the `ray up` monitor, KubeRay's v1 and v2) do not,
  so on the shipped configs it is None. Where present, its node types count as nodes.
- the autoscaler's status: v1 writes a JSON report into the GCS key-value store (node
  type names, pending launches), v2 a state version (`ray.autoscaler.v2.sdk`); neither
  says what a node type holds. They tell only *that* an autoscaler may add nodes of unknown
  shape: a shape that no live node fits then waits (workers.PlacementWatch), not fails,
  and GPU workers must be asked for (`gpus_per_worker`).
Over Ray Client (ray://) this process has no GCS connection: those reads then run as a
zero-CPU task on the cluster.
"""

from pipeline.cluster.join import cluster_runtime_env, connect, join, last_line
from pipeline.cluster.nodes import (
    Cluster,
    Node,
    actor_states,
    cluster_from_view,
    inspect,
    real_autoscaler,
)
from pipeline.cluster.shape import (
    CPU_THREADS_PER_WORKER,
    WorkerShape,
    plan_workers,
    worker_shape,
)

__all__ = [
    "CPU_THREADS_PER_WORKER", "Cluster", "Node", "WorkerShape", "actor_states", "cluster_from_view",
    "cluster_runtime_env", "connect", "inspect", "join", "last_line", "plan_workers", "real_autoscaler",
    "worker_shape",
]  # fmt: skip
