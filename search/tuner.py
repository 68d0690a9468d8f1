"""The search engine: Optuna sampler -> ConcurrencyLimiter, ASHA, and a Ray Tune Tuner around them.

What the sampler hears is a deliberate choice. Ray passes no result to the searcher on the epoch at
which the scheduler stops a trial (`TuneController._process_trial_result` updates the search
algorithm only when the decision is not STOP); that last result arrives with `on_trial_complete`.
`StudySearch` reports it there, so every epoch of every trial reaches Optuna. A trial stopped
before `max_epochs` is told as PRUNED (its per-epoch scores as intermediate values, which is what
Optuna's own pruners do: TPE ranks every finished trial above every stopped one, and stopped ones
by how far they got, then by their score); a finished trial is told COMPLETE with its best epoch's
value, the value the leaderboard ranks it by.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from search.records import write_json
from search.samplers import SAMPLERS

STUDY_FILE, STUDY_NAME, ASHA_FILE = "optuna.journal", "search", "asha_state.json"


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna every epoch of every trial (see the module docstring), marks
    each Optuna trial with its Ray trial id (user attribute `ray_trial_id`), and keeps a copy of
    the study in `folder/optuna.journal`, rewritten whenever a trial ends."""

    def __init__(self, *args, max_epochs: int, folder: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs, self.folder = max_epochs, Path(folder)
        self.reported: dict[str, dict[int, float]] = {}  # Ray trial id -> {epoch: metric}

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
        else:
            self._report(trial_id, result)
            values = [v for v in self.reported[trial_id].values() if not math.isnan(v)]
            if result.get("training_iteration", 0) >= self.max_epochs and values:
                best = max(values) if self._mode == "max" else min(values)
                self._ot_study.tell(self._ot_trials[trial_id], best, state=optuna.trial.TrialState.COMPLETE)
            else:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
        self.write_study()

    def _report(self, trial_id: str, result: dict) -> None:
        step, value = int(result.get("training_iteration", 0)), result.get(self._metric)
        seen = self.reported.setdefault(trial_id, {})
        if value is not None and step not in seen:
            seen[step] = float(value)
            self._ot_trials[trial_id].report(float(value), step)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def write_study(self) -> None:
        """The study as the sampler holds it, copied to `folder/optuna.journal` (atomically)."""
        tmp = self.folder / f".{STUDY_FILE}.tmp"
        tmp.unlink(missing_ok=True)
        copy = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp))), study_name=STUDY_NAME,
                                   direction=self._ot_study.direction)
        copy.add_trials(self._ot_study.get_trials(deepcopy=False))
        os.replace(tmp, self.folder / STUDY_FILE)


def load_study(folder: Path) -> optuna.Study:
    """The study a search kept in `folder` (as `optuna.load_study` opens it)."""
    return optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(folder / STUDY_FILE))))


class RecordingASHA(ASHAScheduler):
    """ASHAScheduler that remembers which trials it stopped (for the leaderboard) and keeps its rungs
    in `folder/asha_state.json`: Ray does not restore a scheduler's state, so without it a resumed
    search would judge every trial against empty rungs.

    The trials of `first` (each backbone's first trial, or the recipes) are not stopped before
    epoch `first_grace` (they are still recorded at every rung they pass). A deep network trained
    from scratch starts slower than a small CNN and its first-epoch score is noisy: judged at epoch
    1 against the small CNN, DenseNet121 scored 0.72 and was stopped on the SARS-CoV-2 CT images,
    where it was the best model (0.96 validation AUC by epoch 2 in a second run of the same config).
    """

    def __init__(self, *, folder: Path, first: list[dict] = (), first_grace: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.folder, self.stopped, self._loaded = Path(folder), set(), False
        self.first, self.first_grace, self.protected = [dict(p) for p in first], first_grace, {}

    def on_trial_add(self, tune_controller, trial):
        self._load()
        for k, point in enumerate(self.first):
            if k not in self.protected.values() and all(trial.config.get(key) == v for key, v in point.items()):
                self.protected[trial.trial_id] = k
                break
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr, 0)
        if decision == self.STOP and trial.trial_id in self.protected and epoch < min(self.first_grace, self._max_t):
            decision, self._num_stopped = self.CONTINUE, self._num_stopped - 1
        if decision == self.STOP and epoch < self._max_t:
            self.stopped.add(trial.trial_id)
        self._save()
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _save(self) -> None:
        write_json(self.folder / ASHA_FILE, {"rungs": [[[m, recorded] for m, recorded in b._rungs] for b in self._brackets],
                                             "stopped": sorted(self.stopped), "protected": self.protected})

    def _load(self) -> None:
        """Once, on first use: the rungs, stops and protected first trials of the search this one
        resumes, if any."""
        if self._loaded:
            return
        self._loaded, path = True, self.folder / ASHA_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self.stopped |= set(state["stopped"])
        self.protected.update(state.get("protected", {}))


def make_searcher(space_fn, *, metric: str, mode: str, sampler: str, seed: int, max_epochs: int,
                  max_concurrent: int, points: list[dict], folder: Path) -> ConcurrencyLimiter:
    """The Optuna searcher (`sampler`: a name in SAMPLERS) over a define-by-run `space_fn`, behind a
    concurrency limit."""
    searcher = StudySearch(space=space_fn, metric=metric, mode=mode, sampler=SAMPLERS[sampler](seed),
                           points_to_evaluate=points or None, max_epochs=max_epochs, folder=folder)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def make_scheduler(*, metric: str, mode: str, max_epochs: int, grace_period: int, folder: Path,
                   reduction_factor: float = 3, first: list[dict] = ()) -> RecordingASHA:
    """ASHA over epochs: trials below the top 1/reduction_factor at a rung stop there; the trials of
    `first` run at least to the second rung (grace_period x reduction_factor epochs)."""
    return RecordingASHA(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_epochs,
                         grace_period=grace_period, reduction_factor=reduction_factor, folder=folder,
                         first=first, first_grace=math.ceil(grace_period * reduction_factor))


def bind_space(space, **options):
    """The space's define-by-run function with its options bound, as OptunaSearch wants it."""
    return functools.partial(space.define, **options)


def with_data(trainable, data, resources: dict, **parameters):
    """`trainable(config, data, **parameters)` as Tune runs it: `data` (a `Dataset`) goes to the
    object store once and every trial reads it from there; each trial holds `resources`."""
    return tune.with_resources(tune.with_parameters(trainable, data=data.for_training(), **parameters), resources)


def make_tuner(trainable, *, searcher, scheduler, num_samples: int, storage: str, name: str, base_config: dict,
               callbacks: list, max_retries: int) -> tune.Tuner:
    """A Tuner over a trainable wrapped by `with_data`."""
    return tune.Tuner(
        trainable,
        param_space=base_config,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )


def fit(tuner: tune.Tuner, *, time_budget: float | None) -> None:
    """`tuner.fit()`, stopped after `time_budget` seconds the way Ctrl-C stops it (Ray's SIGUSR1
    handler): the trials it cuts keep their checkpoints and stay resumable, and the searcher stays
    open. Ray's own `time_budget_s` would mark them finished and the searcher done."""
    if not time_budget:
        tuner.fit()
        return
    done = threading.Event()

    def stop():
        if done.wait(time_budget):
            return
        while True:  # again until fit returns: Ray installs its handler only once fit has started
            os.kill(os.getpid(), signal.SIGUSR1)
            if done.wait(2):
                return

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a signal before Ray's handler is harmless
    timer = threading.Thread(target=stop, daemon=True)
    timer.start()
    try:
        tuner.fit()
    finally:
        done.set()
        signal.signal(signal.SIGUSR1, previous)
