"""The search engine: Optuna sampler -> ConcurrencyLimiter, ASHA, and a Ray Tune Tuner around them.

What the sampler learns from a trial ASHA stopped early is a deliberate choice: Ray's
`OptunaSearch` would tell Optuna such a trial as COMPLETE with its last epoch's score, ranking a
one-epoch score against full runs. Here it is told as PRUNED, with its per-epoch scores as
intermediate values, which is what Optuna's own pruners do: TPE then ranks every finished trial
above every stopped one, and stopped trials by how far they got, then by their score.
"""
from __future__ import annotations

import functools

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search.samplers import SAMPLERS


class AshaAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that reports trials stopped before `max_epochs` to Optuna as PRUNED."""

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if (error or not result or result.get("training_iteration", 0) >= self.max_epochs
                or trial_id in self._completed_trials):
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


class RecordingASHA(ASHAScheduler):
    """ASHAScheduler that remembers which trials it stopped, for the leaderboard."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.stopped.add(trial.trial_id)
        return decision


def make_searcher(space_fn, *, metric: str, mode: str, sampler: str, seed: int, max_epochs: int,
                  max_concurrent: int, points: list[dict]) -> ConcurrencyLimiter:
    """The Optuna searcher (`sampler`: a name in SAMPLERS) over a define-by-run `space_fn`, behind a
    concurrency limit."""
    searcher = AshaAwareOptunaSearch(space=space_fn, metric=metric, mode=mode, sampler=SAMPLERS[sampler](seed),
                                     points_to_evaluate=points or None, max_epochs=max_epochs)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def make_scheduler(*, metric: str, mode: str, max_epochs: int, grace_period: int,
                   reduction_factor: float = 3) -> RecordingASHA:
    """ASHA over epochs: trials below the top 1/reduction_factor at a rung stop there."""
    return RecordingASHA(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_epochs,
                         grace_period=grace_period, reduction_factor=reduction_factor)


def bind_space(space, **options):
    """The space's define-by-run function with its options bound, as OptunaSearch wants it."""
    return functools.partial(space.define, **options)


def with_data(trainable, data, resources: dict):
    """`trainable(config, data)` as Tune runs it: `data` goes to the object store once and every
    trial reads it from there; each trial holds `resources`."""
    return tune.with_resources(tune.with_parameters(trainable, data=data), resources)


def make_tuner(trainable, *, searcher, scheduler, num_samples: int, time_budget: float | None, storage: str,
               name: str, base_config: dict, callbacks: list, max_retries: int) -> tune.Tuner:
    """A Tuner over a trainable wrapped by `with_data`."""
    return tune.Tuner(
        trainable,
        param_space=base_config,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    time_budget_s=time_budget, reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
