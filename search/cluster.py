"""Ray as every command uses it: connected for a block of work, and whether a task fits a node.

Example:
    >>> with connected(None):                       # a local Ray, shut down after the block
    ...     check_fits(1, 0, task="run a trial", flags="--cpus-per-trial / --gpus-per-trial", cluster=False)
"""
from __future__ import annotations

from contextlib import contextmanager

import ray

from trainables import UserError


@contextmanager
def connected(address: str | None):
    """Ray for the block: the one already running, or joined (`address`) or started here and shut
    down after the block."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def check_fits(cpus: float, gpus: float, *, task: str, flags: str, cluster: bool) -> None:
    """Fail when no live node has `cpus` and `gpus` for one `task`; on a cluster (`cluster`), only
    warn, since the autoscaler adds nodes for work that waits.

    Raises:
        UserError: naming what was asked, what the nodes have, and the `flags` that change it.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    have = "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}" for r in nodes)
    need = f"{cpus:g} CPU and {gpus:g} GPU"
    if cluster:
        print(f"warning: no node can {task} with {need} yet (nodes: {have}); it waits until the autoscaler "
              f"adds one", flush=True)
        return
    raise UserError(f"no node can {task} with {need} (nodes: {have}); lower {flags} or add nodes")


def slots(cpus: float, gpus: float) -> int:
    """How many tasks of `cpus` and `gpus` the cluster holds at once (GPUs decide when asked for)."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / cpus))
