"""Every core busy to the last trial. While trials wait or remain to be drawn, each holds the CPUs
it asked for. Once every trial of the search exists and none waits, a node's idle cores (those no
running trial holds) are shared among the trials still running there: each reads its thread count
at its next epoch from a small Ray actor, so no trial restarts. (Ray's ResourceChangingScheduler
restarts a trial to resize it and cannot reuse actors, which on a CPU costs every trial a fresh
worker's imports; see BENCHMARKS.md, issue 18.)

Example:
    >>> name, budget = core_budget("cores-run1")
    >>> trainable = tune.with_parameters(train_classifier, data=data, cores=budget)
    >>> callbacks = [ShareIdleCores(name, num_samples=24, cpus_per_trial=1)]
"""
from __future__ import annotations

import uuid

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class CoreBudget:
    """Per trial (or finalize's retraining task), the threads it may use now (absent: the CPUs it
    asked for); a task says where it started, since Ray does not tell the driver."""

    def __init__(self):
        self.threads: dict[str, int] = {}
        self.nodes: dict[str, str] = {}

    def set(self, threads: dict[str, int]) -> None:
        self.threads = threads

    def get(self, trial_id: str) -> int | None:
        return self.threads.get(trial_id)

    def started(self, key: str, node_ip: str) -> None:
        self.nodes[key] = node_ip

    def started_on(self) -> dict[str, str]:
        return dict(self.nodes)


def core_budget(prefix: str | None = None) -> tuple[str | None, object]:
    """A new `CoreBudget` on the driver's node, the head of a `ray up` cluster (left to Ray, it may land
    on a worker, and losing that worker would take it along), and its name: `prefix` and a random
    suffix, so that two searches of the same name on one cluster never share one."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}" if prefix else None
    return name, CoreBudget.options(scheduling_strategy=here, **({"name": name} if name else {})).remote()


def shares(running: dict[str, str], node_cpus: dict[str, float], cpus_per_trial: float) -> dict[str, int]:
    """Threads per running trial (trial id -> node ip): its own CPUs plus an even share of its node's
    CPUs that no running trial holds (the first trials on a node get the remainder).

    Example:
        >>> shares({"a": "10.0.0.1"}, {"10.0.0.1": 2}, 1)
        {'a': 2}
    """
    out = {}
    for node, cpus in node_cpus.items():
        here = sorted(t for t, n in running.items() if n == node)
        idle = int(cpus - cpus_per_trial * len(here))
        for k, trial_id in enumerate(here):
            out[trial_id] = int(cpus_per_trial) + idle // len(here) + (1 if k < idle % len(here) else 0)
    return out


class ShareIdleCores(tune.Callback):
    """Tells the CoreBudget actor named `budget`, after every result and every trial's end, how to
    share idle cores: nothing while trials remain to run, even shares per node once all have started.
    (It keeps the actor's name, not a handle: Ray pickles callbacks for --resume.)"""

    def __init__(self, budget: str, *, num_samples: int, cpus_per_trial: float):
        self.budget, self.num_samples, self.cpus_per_trial = budget, num_samples, cpus_per_trial
        self.shared: dict[str, int] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update([t for t in trials if t is not trial])

    def _update(self, trials) -> None:
        waiting = len(trials) < self.num_samples or any(t.status == "PENDING" for t in trials)
        running = {t.trial_id: (t.last_result or {}).get("node_ip") for t in trials if t.status == "RUNNING"}
        running = {t: node for t, node in running.items() if node}
        threads = {} if waiting or not running else shares(running, node_cpus(), self.cpus_per_trial)
        if threads != self.shared:
            self.shared = threads
            try:
                ray.get_actor(self.budget).set.remote(threads)
            except ValueError:  # its process died (OOM-killed, say): trials keep the CPUs they asked for
                pass


def share_among_tasks(budget, unfinished: set[str], cpus_per_task: float) -> None:
    """Finalize's retrainings: once none of the `unfinished` tasks waits for a slot, share each
    node's idle cores among those running there (as `ShareIdleCores` does for trials)."""
    try:
        started = ray.get(budget.started_on.remote())
    except ray.exceptions.RayActorError:  # its process died: the tasks keep the CPUs they asked for
        return
    running = {key: node for key, node in started.items() if key in unfinished}
    if running and len(running) == len(unfinished):
        budget.set.remote(shares(running, node_cpus(), cpus_per_task))


def node_cpus() -> dict[str, float]:
    return {n["NodeManagerAddress"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")}
