"""A fix to Ray Tune 2.60's trial controller, for a fault the soak (bench/soak.py) found.

A trial that reuses a cached actor whose node was lost: the `reset` task fails with the actor's
error, and Ray calls two handlers for it. The actor's (`_actor_failed`) requeues the trial, PENDING,
with a retry counted; then the task's (`_trial_task_failure`) finds the trial PENDING and fails it
for good (ERROR, retries left unused, the searcher told FAIL). The trial also stays in
`_resetting_trials`, and a trial there never gets another actor: the search waits for it forever.
`apply()` drops the second call for an actor error on a trial already requeued without an actor,
and takes the trial out of `_resetting_trials` when its reset fails.
"""
from ray.exceptions import RayActorError
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

_original = TuneController._trial_task_failure


def _trial_task_failure(self, trial: Trial, exception: Exception) -> None:
    self._resetting_trials.discard(trial)
    if isinstance(exception, RayActorError) and trial.status == Trial.PENDING and trial not in self._trial_to_actor:
        return  # its actor's failure requeued it already
    _original(self, trial, exception)


def apply() -> None:
    """Install the fix (once; the controller is built inside `Tuner.fit`)."""
    TuneController._trial_task_failure = _trial_task_failure
