"""The engine underneath: what the sampler is told for each trial (on the real OptunaSearch and a
real Optuna study), and the Ray internals this project leans on, named so that a Ray release that
renames them fails here with a clear message instead of deep inside a search."""
import json
from types import SimpleNamespace

import optuna
import pytest
import ray
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from search.engine.tuner import StudySearch, load_study, make_scheduler

SUPPORTED = "ray 2.60 (pyproject.toml pins the range)"


def _space(trial):
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)


def _searcher(tmp_path, max_epochs=3):
    return StudySearch(space=_space, metric="val_auc", mode="max", max_epochs=max_epochs, folder=tmp_path,
                       sampler=optuna.samplers.RandomSampler(seed=0))


def _result(epoch, auc):
    return {"training_iteration": epoch, "val_auc": auc}


def test_ray_internals_the_searcher_and_scheduler_use_still_exist(tmp_path):
    searcher = _searcher(tmp_path)
    for name in ("_ot_trials", "_ot_study", "_completed_trials", "_metric", "_mode"):
        assert hasattr(searcher, name), (f"ray {ray.__version__}: OptunaSearch has no attribute {name!r}; "
                                         f"search/engine/tuner.py StudySearch was written for {SUPPORTED}")
    assert isinstance(searcher._ot_study, optuna.Study), f"ray {ray.__version__}: OptunaSearch._ot_study changed"
    scheduler = make_scheduler(metric="val_auc", mode="max", max_epochs=4, grace_period=1)
    for name in ("_time_attr", "_max_t", "_num_stopped", "_brackets", "STOP", "CONTINUE"):
        assert hasattr(scheduler, name), (f"ray {ray.__version__}: ASHAScheduler has no attribute {name!r}; "
                                          f"search/engine/tuner.py RecordingASHA was written for {SUPPORTED}")
    rungs = scheduler._brackets[0]._rungs
    assert all(isinstance(m, (int, float)) and isinstance(recorded, dict) for m, recorded in rungs), (
        f"ray {ray.__version__}: an ASHA bracket's _rungs is no longer [(milestone, {{trial: score}})]; "
        f"RecordingASHA saves and restores it ({SUPPORTED})")
    assert isinstance(scheduler, ASHAScheduler)
    # restore_tuner hands a restored Tuner this search's searcher, scheduler and callbacks, and _Generator
    # points the trials it creates after a resume at the experiment's folder now
    from ray.tune.impl.tuner_internal import TunerInternal
    from ray.tune.search import SearchGenerator
    internal = TunerInternal(trainable=lambda config: None, _tuner_kwargs={},
                             run_config=ray.tune.RunConfig(storage_path=str(tmp_path), name="probe"))
    assert {"search_alg", "scheduler"} <= set(vars(internal._tune_config)) and hasattr(internal._run_config, "callbacks"), (
        f"ray {ray.__version__}: TunerInternal no longer keeps _tune_config / _run_config ({SUPPORTED})")
    assert {"experiment"} <= set(SearchGenerator(searcher).get_state()), (
        f"ray {ray.__version__}: SearchGenerator's state no longer holds its experiment ({SUPPORTED})")


def test_a_stopped_trial_reaches_optuna_with_its_stopping_epoch_and_a_finished_one_with_its_best(tmp_path):
    searcher = _searcher(tmp_path)
    for trial_id in ("stopped", "finished", "failed"):
        assert searcher.suggest(trial_id)["lr"] > 0
    # Ray passes results through on_trial_result, except the one on which a scheduler stops the
    # trial: that one arrives only with on_trial_complete
    searcher.on_trial_result("stopped", _result(1, 0.61))
    searcher.on_trial_complete("stopped", _result(2, 0.58))
    for epoch, auc in ((1, 0.70), (2, 0.91)):
        searcher.on_trial_result("finished", _result(epoch, auc))
    searcher.on_trial_complete("finished", _result(3, 0.88))
    searcher.on_trial_complete("failed", error=True)
    searcher.on_trial_complete("finished", _result(3, 0.88))  # a repeated completion changes nothing

    study = load_study(tmp_path)  # the copy in the experiment folder, opened with Optuna's own API
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert by_id["stopped"].state == optuna.trial.TrialState.PRUNED
    assert by_id["stopped"].intermediate_values == {1: 0.61, 2: 0.58}
    assert by_id["finished"].state == optuna.trial.TrialState.COMPLETE
    assert by_id["finished"].value == 0.91  # its best epoch: what the leaderboard ranks it by
    assert by_id["finished"].intermediate_values == {1: 0.70, 2: 0.91, 3: 0.88}
    assert by_id["failed"].state == optuna.trial.TrialState.FAIL


def test_a_failed_trial_that_runs_again_ends_in_a_new_optuna_trial_and_the_fail_stays(tmp_path):
    """--resume of a search that ended with a trial ERROR runs it again: its results reach a new Optuna
    trial with the same parameters and its epochs so far, which ends COMPLETE; the journal keeps the FAIL."""
    searcher = _searcher(tmp_path)
    params = searcher.suggest("flaky")
    searcher.on_trial_result("flaky", _result(1, 0.70))
    searcher.on_trial_complete("flaky", error=True)
    searcher.on_trial_result("flaky", _result(1, 0.70))  # resumed from before its checkpoint: epoch 1 again
    searcher.on_trial_result("flaky", _result(2, 0.90))
    searcher.on_trial_complete("flaky", _result(3, 0.85))
    searcher.on_trial_complete("flaky", _result(3, 0.85))  # a repeated completion changes nothing
    trials = load_study(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert {t.user_attrs["ray_trial_id"] for t in trials} == {"flaky"} and trials[1].params == params
    assert trials[0].intermediate_values == {1: 0.70}
    assert trials[1].intermediate_values == {1: 0.70, 2: 0.90, 3: 0.85} and trials[1].value == 0.90
    assert [t.state.name for t in searcher.study.trials] == ["FAIL", "COMPLETE"]


def test_tpe_tells_stopped_trials_apart_by_their_score(tmp_path):
    """With the stopping epoch reported, TPE ranks two trials stopped at the same rung by score
    (without it, both had no intermediate value and the same rank)."""
    from optuna.samplers._tpe.sampler import _get_pruned_trial_score
    searcher = _searcher(tmp_path)
    for trial_id, auc in (("weak", 0.55), ("strong", 0.95)):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, _result(1, auc))
    study = load_study(tmp_path)
    scores = {t.user_attrs["ray_trial_id"]: _get_pruned_trial_score(t, study) for t in study.trials}
    assert scores["strong"] < scores["weak"]  # lower sorts first: the better trial


def test_a_backbones_first_trial_is_not_stopped_before_the_second_rung(tmp_path):
    """The enqueued first trial of a backbone survives a weak first epoch (rungs at epochs 1, 3, 9);
    a later trial of the same backbone is judged like any other; a resumed search keeps both facts."""
    first = [{"backbone": "densenet121", "lr": 1e-3}]
    trials = {name: SimpleNamespace(trial_id=name, config={"backbone": backbone, "lr": 1e-3, "dropout": 0.2})
              for name, backbone in (("cnn", "small_cnn"), ("dense", "densenet121"), ("dense2", "densenet121"))}
    scheduler = make_scheduler(metric="val_auc", mode="max", max_epochs=9, grace_period=1, first=first)
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trials["cnn"], _result(1, 0.90)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["dense"], _result(1, 0.70)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["dense"], _result(2, 0.80)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["dense2"], _result(1, 0.70)) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, trials["cnn"], _result(3, 0.95)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["dense"], _result(3, 0.85)) == TrialScheduler.STOP  # judged at rung 2
    assert scheduler.stopped == {"dense", "dense2"}

    resumed = make_scheduler(metric="val_auc", mode="max", max_epochs=9, grace_period=1, first=first)
    resumed.load_state(json.loads(json.dumps(scheduler.state())))  # as Ray's experiment state carries it
    later = SimpleNamespace(trial_id="dense3", config={"backbone": "densenet121", "lr": 1e-3})
    resumed.on_trial_add(None, later)
    assert resumed.protected == {"dense": 0}  # the point was used before the resume
    assert resumed.on_trial_result(None, later, _result(1, 0.70)) == TrialScheduler.STOP


def test_a_trial_stopped_at_a_rung_and_run_again_by_a_fault_stays_stopped():
    """A worker killed after ASHA's stop decision but before the stop took: Ray runs the trial again
    from its checkpoint and it reports the rung a second time. Ray's ASHA finds it recorded there and
    lets it go on; here it stops where the undisturbed search stopped it."""
    scheduler = make_scheduler(metric="val_auc", mode="max", max_epochs=9, grace_period=1)
    strong, weak = (SimpleNamespace(trial_id=name, config={}) for name in ("strong", "weak"))
    for trial in (strong, weak):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, strong, _result(1, 0.90)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, _result(1, 0.60)) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, weak, _result(1, 0.60)) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, strong, _result(1, 0.90)) == TrialScheduler.CONTINUE


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "gp"])
def test_every_sampler_the_options_offer_builds(sampler):
    from search.engine.samplers import SAMPLERS
    assert isinstance(SAMPLERS[sampler](0), optuna.samplers.BaseSampler)


@pytest.mark.parametrize("first, startup", [(0, 10), (1, 4), (4, 4), (9, 9)])
def test_the_first_trials_are_the_samplers_start(tmp_path, first, startup):
    """With first trials (one per backbone), TPE models from the trial after them; at a CT budget of
    9-12 trials, Optuna's 10 random start-up trials would leave nothing for it to model."""
    from search.engine.tuner import make_searcher
    points = [{"backbone": f"b{k}"} for k in range(first)]
    limiter = make_searcher(_space, metric="val_auc", mode="max", sampler="tpe", seed=0, max_epochs=3,
                            max_concurrent=1, points=points, folder=tmp_path)
    assert limiter.searcher._sampler._n_startup_trials == startup


def test_a_journal_cut_short_by_a_crash_is_repaired_before_the_next_append(tmp_path, capsys):
    """A crash in mid-append leaves half a line; the next append would land on it and Optuna could
    read nothing. It is cut off (and kept) first; a journal damaged in its middle is set aside and
    written again from the searcher's study. Optuna's own JournalStorage reads every trial after."""
    from search.engine.tuner import STUDY_FILE
    searcher = _searcher(tmp_path)
    for k, trial_id in enumerate(("a", "b", "c")):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, _result(3, 0.5 + k / 10))
        if trial_id == "a":
            with open(tmp_path / STUDY_FILE, "a") as f:
                f.write('{"op_code": 5, "worker_id": "x", "trial_id": 1, "st')  # half a line, as a crash leaves it
            out = capsys.readouterr().out
        if trial_id == "b":
            assert "ended in a line cut short" in capsys.readouterr().out
    assert [t.user_attrs["ray_trial_id"] for t in load_study(tmp_path).trials] == ["a", "b", "c"]
    assert (tmp_path / f"{STUDY_FILE}.torn").read_text().startswith('{"op_code": 5')
    assert "warning" not in out

    lines = (tmp_path / STUDY_FILE).read_text().splitlines()  # damaged in the middle (written by an older version)
    (tmp_path / STUDY_FILE).write_text("\n".join(lines[:3] + [lines[3][:20]] + lines[4:]) + "\n")
    searcher.suggest("d")
    searcher.on_trial_complete("d", _result(3, 0.9))
    assert "cannot be read" in capsys.readouterr().out
    assert [t.user_attrs["ray_trial_id"] for t in load_study(tmp_path).trials] == ["a", "b", "c", "d"]
    assert len(list(tmp_path.glob(f"{STUDY_FILE}.damaged-*"))) == 1


def test_engine_messages_go_on_when_engine_log_cannot_be_written(tmp_path, capfd):
    """A full or read-only disk: the console keeps its one engine: line, and logging prints no trace."""
    import logging

    from search.engine.cluster import engine_messages
    (tmp_path / "engine.log").mkdir()  # cannot be opened as a file, as on a full disk
    with engine_messages(tmp_path):
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial a failed\nTraceback ...")
    err = capfd.readouterr().err
    assert err.splitlines() == [f"engine: Trial a failed (details: {tmp_path / 'engine.log'})"], err
