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
import pickle
import pickletools
import signal
import threading
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from core.errors import UserError
from search.engine import ray_internals as internals
from search.engine.checkpoints import stand_in_for_lost
from search.outputs.records import cut_torn_tail, write_atomic
from search.engine.samplers import SAMPLERS
from search.engine.stop_rule import StopRule, validation_error

STUDY_FILE, STUDY_NAME = "optuna.journal", "search"


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna every epoch of every trial (see the module docstring), marks
    each Optuna trial with its Ray trial id (user attribute `ray_trial_id`), and appends each trial
    that ends to `folder/optuna.journal`: a journal only grows, so optuna-dashboard can watch it while
    the search runs. With a `stop_rule` it proposes no more trials once the rule says more cannot
    beat the best by more than validation resolves (`val_counts`: the validation split's images per
    class, for the error of a search without folds)."""

    def __init__(self, *args, max_epochs: int, folder: Path, stop_rule: StopRule | None = None,
                 val_counts: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs, self.folder = max_epochs, Path(folder)
        self.reported: dict[str, dict[int, float]] = {}  # Ray trial id -> {epoch: metric}
        self.errors: dict[str, dict[int, float | None]] = {}  # Ray trial id -> {epoch: validation error}
        self.fixed: set[str] = set()  # Ray trial ids of the first trials, at fixed values
        self.stop_rule, self.val_counts = stop_rule, val_counts

    def suggest(self, trial_id: str) -> dict | None:
        if self.stop_rule and self.stop_rule.stopped:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if trial_id in internals.optuna_trials(self):
            ot_trial = internals.optuna_trials(self)[trial_id]
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            if "fixed_params" in self.study.get_trials(deepcopy=False)[ot_trial.number].system_attrs:
                self.fixed.add(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in internals.completed_trials(self) or self._runs_again(trial_id):
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in internals.completed_trials(self) and not self._runs_again(trial_id):
            return
        if error or not result:
            super().on_trial_complete(trial_id, result, error)
        else:
            self._report(trial_id, result)
            values = [v for v in self.reported[trial_id].values() if not math.isnan(v)]
            if result.get("training_iteration", 0) >= self.max_epochs and values:
                best = max(values) if self.mode == "max" else min(values)
                self.study.tell(internals.optuna_trials(self)[trial_id], best, state=optuna.trial.TrialState.COMPLETE)
            else:
                self.study.tell(internals.optuna_trials(self)[trial_id], state=optuna.trial.TrialState.PRUNED)
            internals.completed_trials(self).add(trial_id)
        self.write_study()
        if self.stop_rule and trial_id in internals.completed_trials(self):
            self._judge(trial_id)

    def _runs_again(self, trial_id: str) -> bool:
        """Whether a trial Optuna was told FAIL runs again (`--resume` of a search that ended with it ERROR):
        a new Optuna trial with its parameters and epochs so far takes its results (the FAIL stays)."""
        told = self.study.get_trials(deepcopy=False)[internals.optuna_trials(self)[trial_id].number]
        if told.state != optuna.trial.TrialState.FAIL:
            return False
        self.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING, params=told.params, distributions=told.distributions,
            user_attrs=told.user_attrs, system_attrs=told.system_attrs, intermediate_values=told.intermediate_values))
        internals.optuna_trials(self)[trial_id] = internals.live_trial(self.study, self.study.get_trials(deepcopy=False)[-1])
        internals.completed_trials(self).discard(trial_id)
        return True

    def _judge(self, trial_id: str) -> None:
        """Tell the stop rule the trial's best epoch and its error, and the best epoch so far of each
        trial still running; say so when the rule stops the search."""
        seen, errors, pick = self.reported.get(trial_id, {}), self.errors.get(trial_id, {}), max if self.mode == "max" else min
        steps = [s for s, v in seen.items() if not math.isnan(v)]
        step = pick(steps, key=seen.get) if steps else None
        ended = internals.completed_trials(self)
        running = tuple(pick(values) for other, epochs in self.reported.items() if other not in ended
                        if (values := [v for v in epochs.values() if not math.isnan(v)]))
        was = self.stop_rule.stopped
        if self.stop_rule.update(trial_id, seen.get(step), errors.get(step), proposed=trial_id not in self.fixed,
                                 running=running) and not was:
            print(f"stop rule: {self.stop_rule.reason(self.metric)}; no more trials start and the running ones stop "
                  f"where they are (--no-stop-rule runs the whole budget)", flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)  # Ray's stop on a signal: running trials keep their checkpoints

    def _report(self, trial_id: str, result: dict) -> None:
        step, value = int(result.get("training_iteration", 0)), result.get(self.metric)
        seen = self.reported.setdefault(trial_id, {})
        if value is not None and step not in seen:
            seen[step] = float(value)
            self.errors.setdefault(trial_id, {})[step] = validation_error(result, self.metric, self.val_counts)
            internals.optuna_trials(self)[trial_id].report(float(value), step)

    @property
    def study(self) -> optuna.Study:
        return internals.optuna_study(self)

    def write_study(self) -> None:
        """Append the trials that ended since the last call to `folder/optuna.journal` (the ones it
        holds are known by their Ray trial id, so a resumed search appends only what is new). A line
        cut short by a crash is cut off first; a journal Optuna cannot read at all is set aside and
        written again from this searcher's own study, which holds every trial."""
        path = self.folder / STUDY_FILE
        cut_torn_tail(path)
        try:
            journal = self._journal(path)
            kept = {_journal_key(t) for t in journal.get_trials(deepcopy=False)}
        except Exception as exc:  # Optuna raises JSONDecodeError, KeyError... for a damaged journal
            damaged = path.with_name(f"{STUDY_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(damaged)
            print(f"warning: {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); kept as {damaged.name}, "
                  f"and written again from the search's own copy of the study", flush=True)
            journal, kept = self._journal(path), set()
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state.is_finished() and _journal_key(trial) not in kept:
                journal.add_trial(trial)

    def _journal(self, path: Path) -> optuna.Study:
        return optuna.create_study(storage=JournalStorage(JournalFileBackend(str(path))), study_name=STUDY_NAME,
                                   direction=self.study.direction, load_if_exists=True)

    def save(self, checkpoint_path: str):
        """The searcher's state, without its folder (a resumed copy of the experiment keeps its own),
        written whole or not at all: a disk that fills up mid-write leaves the previous state."""
        state = {k: v for k, v in self.__dict__.items() if k != "folder"}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
        write_atomic(Path(checkpoint_path), write)

    def restore(self, checkpoint_path: str):
        folder = self.folder
        super().restore(checkpoint_path)
        self.folder = folder


def _journal_key(trial: optuna.trial.FrozenTrial) -> tuple:  # a trial that failed and ran again is there twice
    return trial.user_attrs.get("ray_trial_id"), trial.state == optuna.trial.TrialState.FAIL


def load_study(folder: Path) -> optuna.Study:
    """The study a search kept in `folder` (as `optuna.load_study` opens it)."""
    return optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(folder / STUDY_FILE))))


class RecordingASHA(ASHAScheduler):
    """ASHAScheduler that remembers which trials it stopped (for the leaderboard), and whose rungs,
    stops and protected trials travel with Ray's experiment state (`SchedulerState`): Ray does not
    restore a scheduler, so without them a resumed search would judge every trial against empty rungs.

    The trials of `first` (each backbone's first trial, or the recipes) are not stopped before
    epoch `first_grace` (they are still recorded at every rung they pass). A deep network trained
    from scratch starts slower than a small CNN and its first-epoch score is noisy: judged at epoch
    1 against the small CNN, DenseNet121 scored 0.72 and was stopped on the SARS-CoV-2 CT images,
    where it was the best model (0.96 validation AUC by epoch 2 in a second run of the same config).
    """

    def __init__(self, *, first: list[dict] = (), first_grace: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.stopped: set[str] = set()
        self.first, self.first_grace, self.protected = [dict(p) for p in first], first_grace, {}

    def on_trial_add(self, tune_controller, trial):
        for k, point in enumerate(self.first):
            if k not in self.protected.values() and all(trial.config.get(key) == v for key, v in point.items()):
                self.protected[trial.trial_id] = k
                break
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id in self.stopped:  # stopped at a rung, then run again by a fault before the stop took
            return self.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch, max_t = result.get(internals.asha_time_attr(self), 0), internals.asha_max_t(self)
        if decision == self.STOP and trial.trial_id in self.protected and epoch < min(self.first_grace, max_t):
            decision = self.CONTINUE
            internals.uncount_stop(self)
        if decision == self.STOP and epoch < max_t:
            self.stopped.add(trial.trial_id)
        return decision

    def state(self) -> dict:
        return {"rungs": [[[m, recorded] for m, recorded in bracket] for bracket in internals.asha_rungs(self)],
                "stopped": sorted(self.stopped), "protected": dict(self.protected)}

    def load_state(self, state: dict) -> None:
        internals.set_asha_rungs(self, state["rungs"])
        self.stopped, self.protected = set(state["stopped"]), dict(state["protected"])


class SchedulerState(tune.Callback):
    """Carries the scheduler's state in Ray's experiment checkpoint, which `Tuner.restore` brings
    back before it re-adds the trials: the rungs always match the trials' own saved state. (A file of
    our own in the experiment folder would be overwritten by Ray's copy of it from the start of a
    resumed run: Ray syncs every .json of the folder down on restore and back up at each checkpoint.)"""

    def __init__(self, scheduler: RecordingASHA):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"asha": self.scheduler.state()}

    def set_state(self, state: dict) -> None:
        self.scheduler.load_state(state["asha"])


def make_searcher(space_fn, *, metric: str, mode: str, sampler: str, seed: int, max_epochs: int,
                  max_concurrent: int, points: list[dict], folder: Path, stop_patience: int | None = None,
                  val_counts: list[int] | None = None) -> ConcurrencyLimiter:
    """The Optuna searcher (`sampler`: a name in SAMPLERS) over a define-by-run `space_fn`, behind a
    concurrency limit; with `stop_patience`, under the stop rule (search/engine/stop_rule.py)."""
    ceiling = 1.0 if metric in ("val_auc", "val_acc", "val_f1") else None
    rule = StopRule(patience=stop_patience, mode=mode, first=len(points), ceiling=ceiling) if stop_patience else None
    startup = max(len(points), 4) if points else 10  # the first trials are the sampler's start
    searcher = StudySearch(space=space_fn, metric=metric, mode=mode, sampler=SAMPLERS[sampler](seed, startup=startup),
                           points_to_evaluate=points or None, max_epochs=max_epochs, folder=folder,
                           stop_rule=rule, val_counts=val_counts)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def make_scheduler(*, metric: str, mode: str, max_epochs: int, grace_period: int,
                   reduction_factor: float = 3, first: list[dict] = ()) -> RecordingASHA:
    """ASHA over epochs: trials below the top 1/reduction_factor at a rung stop there; the trials of
    `first` run at least to the second rung (grace_period x reduction_factor epochs)."""
    return RecordingASHA(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_epochs,
                         grace_period=grace_period, reduction_factor=reduction_factor,
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
    internals.fix_requeued_trial_failure()
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


def restore_tuner(folder: Path, trainable, *, searcher, scheduler, callbacks: list) -> tune.Tuner:
    """The Tuner of the search in `folder`, to continue it, running `searcher`, `scheduler` and
    `callbacks` (built for `folder`; Ray restores the searcher's and the callbacks' state into them).

    `Tuner.restore` alone would run the ones pickled when the search started, with the folder they had
    then: a moved or copied experiment would read and write the original's files. Ray has no public
    way to give a restored Tuner new ones (`ray_internals.give_restored_tuner`)."""
    internals.fix_requeued_trial_failure()
    check_state_files(folder)
    stand_in_for_lost(folder)
    tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=True)
    internals.give_restored_tuner(tuner, search_alg=_Generator(searcher, folder), scheduler=scheduler,
                                  callbacks=callbacks)
    return tuner


def check_state_files(folder: Path) -> None:
    """Read through the state files `Tuner.restore` reads (the newest of each kind), executing
    nothing: Ray meets a file cut short by printing "Failed to restore the run state" and then waits
    forever.

    Raises:
        UserError: naming the file that cannot be read, and what to do.
    """
    kinds = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl", "callback-states-*.pkl")
    for path in [folder / "tuner.pkl", *(max(found) for kind in kinds if (found := sorted(folder.glob(kind))))]:
        try:
            data = path.read_bytes()
            if data[:1] == b"\x80":  # a pickle (Ray pickles some of its .json files too)
                for _ in pickletools.genops(data):  # raises at a stream without its end
                    pass
            else:
                json.loads(data)
        except (OSError, ValueError) as exc:
            raise UserError(f"the search's state file {path} cannot be read ({type(exc).__name__}: "
                            f"{str(exc)[:80]}), cut short by a full disk or a crash: continue from a copy of "
                            f"{folder.name} made before, or start a new search with --warm-start {folder} to "
                            f"keep what its trials taught the sampler") from None


class _Generator(SearchGenerator):
    """Ray's wrapper of a searcher, whose restored state names the folder the search started in:
    the trials it creates after a resume would write their checkpoints there. It is told `folder`."""

    def __init__(self, searcher, folder: Path):
        super().__init__(searcher)
        self.folder = Path(folder)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        internals.move_experiment(self, self.folder)


def fit(tuner: tune.Tuner, *, time_budget: float | None, low_space=None) -> str | None:
    """`tuner.fit()`, stopped after `time_budget` seconds, at the first Ctrl-C, or when `low_space()`
    (asked every second) returns a message, the way Ray stops on a signal (its SIGUSR1 handler):
    the trials it cuts keep their checkpoints and stay resumable, and the searcher stays open (Ray's
    own `time_budget_s` would mark them finished and the searcher done). A second Ctrl-C raises
    KeyboardInterrupt at once. Returns "interrupted" (Ctrl-C), the low-space message, or None: Ray
    returns normally either way."""
    stop, interrupted, done, why = threading.Event(), threading.Event(), threading.Event(), []

    def on_ctrl_c(*_):
        interrupted.set()
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def stopper():
        deadline = time.time() + time_budget if time_budget else math.inf
        while not stop.wait(min(1.0, max(deadline - time.time(), 0))) and time.time() < deadline:
            if low_space and (message := low_space()):
                why.append(message)
                break
        while not done.is_set():  # again until fit returns: Ray installs its handler only once fit has started
            os.kill(os.getpid(), signal.SIGUSR1)
            done.wait(2)

    previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, lambda *_: None),  # harmless before Ray's handler
                signal.SIGINT: signal.signal(signal.SIGINT, on_ctrl_c)}
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C is ours; Ray's handler would hide it
    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    try:
        tuner.fit()
    finally:
        done.set()
        stop.set()
        thread.join()  # no signal of its own arrives after the handlers are back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return "interrupted" if interrupted.is_set() else (why[0] if why else None)
