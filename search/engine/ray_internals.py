"""Every place the search reaches into Ray Tune or Optuna past their public API, behind one door.

Each function names the private attribute or method it relies on and why no public way serves;
`tests/test_ray_internals.py` checks each against the installed versions, so that an upgrade that
moves one fails there, not in the middle of a search; `tests/test_structure.py` checks that no other
module touches a private attribute of Ray or Optuna. The pins in pyproject.toml (`ray[tune]>=2.60,<2.61`,
`optuna>=4.0,<5.1`) are the versions these were read from: Ray changes its controller and Tuner
internals between minor releases, so a Ray upgrade starts here.
"""
from __future__ import annotations

from pathlib import Path

import optuna
from ray.exceptions import RayActorError
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

# ---- Optuna, as Ray's OptunaSearch holds it: the searcher keeps its study and its Optuna trial per
# Ray trial in private fields, and has no public way to report an intermediate value or tell a trial
# PRUNED (search.engine.tuner.StudySearch tells Optuna every epoch, issue 9).


def optuna_trials(searcher) -> dict[str, optuna.Trial]:
    """Ray trial id -> the Optuna trial OptunaSearch asked for it (`OptunaSearch._ot_trials`)."""
    return searcher._ot_trials


def optuna_study(searcher) -> optuna.Study:
    """The study OptunaSearch samples from (`OptunaSearch._ot_study`)."""
    return searcher._ot_study


def completed_trials(searcher) -> set[str]:
    """The Ray trial ids OptunaSearch has told a final state (`OptunaSearch._completed_trials`)."""
    return searcher._completed_trials


def live_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """An Optuna trial to report to, for a trial of `study` (its storage id, `FrozenTrial._trial_id`):
    Optuna makes one public only through `study.ask()`, which would start a new trial."""
    return optuna.Trial(study, frozen._trial_id)


def distribution_holds(distribution: optuna.distributions.BaseDistribution, value) -> bool:
    """Whether `value` lies in `distribution` (`BaseDistribution._contains`, the check Optuna runs on
    `create_trial`, where it raises rather than answers; a categorical raises already for a value not among
    its choices)."""
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except ValueError:
        return False


# ---- Ray's ASHA: its rungs are not part of Ray's experiment state, so a resumed search would judge every
# trial against empty rungs; and a stop ASHA decided may be taken back for a protected first trial.


def asha_rungs(scheduler) -> list[list[tuple[int, dict]]]:
    """Per bracket, its rungs as (milestone, {trial id: score}) (`_Bracket._rungs` of `ASHAScheduler._brackets`)."""
    return [[(milestone, dict(recorded)) for milestone, recorded in bracket._rungs] for bracket in scheduler._brackets]


def set_asha_rungs(scheduler, rungs: list) -> None:
    """Put back rungs as `asha_rungs` gave them."""
    for bracket, kept in zip(scheduler._brackets, rungs):
        bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in kept]


def asha_time_attr(scheduler) -> str:
    return scheduler._time_attr


def asha_max_t(scheduler) -> int:
    return scheduler._max_t


def uncount_stop(scheduler) -> None:
    """A STOP the scheduler counted is taken back (`ASHAScheduler._num_stopped`, its debug count)."""
    scheduler._num_stopped -= 1


# ---- Ray's Tuner and searcher wrapper on restore: `Tuner.restore` runs the searcher, scheduler and callbacks
# pickled when the search started, with the folder they had then; Ray has no public way to give a
# restored Tuner new ones, nor to tell the restored wrapper where the experiment is now.


def give_restored_tuner(tuner, *, search_alg, scheduler, callbacks: list) -> None:
    """The restored Tuner runs these (`Tuner._local_tuner._tune_config`, `._run_config`)."""
    internal = tuner._local_tuner
    internal._tune_config.search_alg, internal._tune_config.scheduler = search_alg, scheduler
    internal._run_config.callbacks = callbacks


def move_experiment(generator, folder: Path) -> None:
    """The restored `SearchGenerator`'s experiment writes to `folder` (`SearchGenerator._experiment.storage`)."""
    storage = generator._experiment.storage
    storage.storage_fs_path, storage.experiment_dir_name = folder.parent.as_posix(), folder.name


# ---- Ray's TensorBoard logger keeps its writers and last results per trial in private fields.


def trial_writers(callback) -> dict:
    """Trial -> its tensorboardX writer (`TBXLoggerCallback._trial_writer`)."""
    return callback._trial_writer


def skip_last_hparams(callback, trial) -> None:
    """The logger writes no HParams entry of its own (the last epoch's) at the trial's end (`_trial_result`)."""
    callback._trial_result[trial] = {}


# ---- Ray's token authentication for an explicit head address.


def use_token_if_available() -> None:
    """Ray turns token authentication on by itself only for `address="auto"`; for a head's host:port the
    same private helper `ray start` uses does it (`ray._private.authentication`)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


# ---- A fix to Ray Tune 2.60's trial controller, for a fault the soak (bench/soak.py) found. A trial that
# reuses a cached actor whose node was lost: the `reset` task fails with the actor's error, and Ray calls
# two handlers for it. The actor's (`_actor_failed`) requeues the trial, PENDING, with a retry counted;
# then the task's (`_trial_task_failure`) finds the trial PENDING and fails it for good (ERROR, retries
# left unused, the searcher told FAIL). The trial also stays in `_resetting_trials`, and a trial there
# never gets another actor: the search waits for it forever. Not yet reported upstream (Ray 2.60).

_original_task_failure = TuneController._trial_task_failure


def _trial_task_failure(self, trial: Trial, exception: Exception) -> None:
    self._resetting_trials.discard(trial)
    if isinstance(exception, RayActorError) and trial.status == Trial.PENDING and trial not in self._trial_to_actor:
        return  # its actor's failure requeued it already
    _original_task_failure(self, trial, exception)


def fix_requeued_trial_failure() -> None:
    """Drop the second call for an actor error on a trial already requeued without an actor, and take
    the trial out of `_resetting_trials` when its reset fails (once; the controller is built inside
    `Tuner.fit`)."""
    TuneController._trial_task_failure = _trial_task_failure
