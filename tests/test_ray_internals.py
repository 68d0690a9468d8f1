"""Each private attribute of Ray or Optuna the search relies on (`search/engine/ray_internals.py`), checked
on the installed versions: an upgrade that renames or reshapes one fails here, by name. What the
search does with them is tested by the searches themselves (resume into a copy and ASHA's rungs:
tests/test_fault_tolerance.py; a lost node's requeued trial: tests/test_soak.py; every epoch told
to Optuna: tests/test_search.py)."""
import inspect
import re
import tempfile
from pathlib import Path

import optuna
import pytest
from ray import tune
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Experiment
from ray.tune.logger import TBXLoggerCallback
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from search.engine import ray_internals as internals
from search.engine.tuner import make_scheduler


def _space(trial):
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)


def test_optuna_search_keeps_its_study_its_trials_and_what_it_told():
    searcher = OptunaSearch(space=_space, metric="val_auc", mode="max", sampler=optuna.samplers.RandomSampler(seed=0))
    config = searcher.suggest("t1")
    trials, study = internals.optuna_trials(searcher), internals.optuna_study(searcher)
    assert isinstance(study, optuna.Study) and isinstance(trials["t1"], optuna.Trial)
    assert study.trials[trials["t1"].number].params["lr"] == config["lr"]
    assert internals.completed_trials(searcher) == set()
    searcher.on_trial_complete("t1", {"val_auc": 0.7, "training_iteration": 1})
    assert internals.completed_trials(searcher) == {"t1"} and study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert searcher.metric == "val_auc" and searcher.mode == "max"  # public: no door needed


def test_a_frozen_trial_gives_a_live_one_and_distributions_answer_whether_they_hold_a_value():
    study = optuna.create_study()
    study.ask()
    internals.live_trial(study, study.get_trials(deepcopy=False)[-1]).report(0.4, 1)
    assert study.trials[-1].intermediate_values == {1: 0.4}
    rate = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    choice = optuna.distributions.CategoricalDistribution(["resnet18", "small_cnn"])
    assert internals.distribution_holds(rate, 1e-3) and not internals.distribution_holds(rate, 0.5)
    assert internals.distribution_holds(choice, "small_cnn") and not internals.distribution_holds(choice, "vgg")


def test_asha_rungs_travel_out_and_back_and_a_stop_can_be_uncounted():
    scheduler = make_scheduler(metric="val_auc", mode="max", max_epochs=9, grace_period=1)
    rungs = internals.asha_rungs(scheduler)
    milestones = [milestone for milestone, _ in rungs[0]]
    assert {1, 3} <= set(milestones) and all(r == {} for _, r in rungs[0])
    rungs[0][milestones.index(1)][1]["t1"] = 0.8
    internals.set_asha_rungs(scheduler, rungs)
    assert internals.asha_rungs(scheduler)[0][milestones.index(1)] == (1, {"t1": 0.8})
    assert internals.asha_time_attr(scheduler) == "training_iteration" and internals.asha_max_t(scheduler) == 9
    before = scheduler._num_stopped
    internals.uncount_stop(scheduler)
    assert scheduler._num_stopped == before - 1


def test_a_restored_tuner_and_its_search_wrapper_take_new_parts_and_a_new_folder(tmp_path):
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path), name="x"))
    searcher, callbacks = SearchGenerator(OptunaSearch(space=_space, metric="val_auc", mode="max")), [tune.Callback()]
    scheduler = make_scheduler(metric="val_auc", mode="max", max_epochs=3, grace_period=1)
    internals.give_restored_tuner(tuner, search_alg=searcher, scheduler=scheduler, callbacks=callbacks)
    config = tuner._local_tuner._tune_config
    assert config.search_alg is searcher and config.scheduler is scheduler
    assert tuner._local_tuner._run_config.callbacks is callbacks
    experiment = Experiment("started-here", run=lambda config: None, storage_path=tempfile.mkdtemp())
    searcher.set_state({"counter": 0, "total_samples": 1, "finished": False, "experiment": experiment})
    internals.move_experiment(searcher, tmp_path / "moved" / "copy")
    assert (experiment.storage.storage_fs_path, experiment.storage.experiment_dir_name) == \
        ((tmp_path / "moved").as_posix(), "copy")


def test_the_tensorboard_logger_keeps_its_writers_and_last_results_per_trial():
    callback = TBXLoggerCallback()
    assert internals.trial_writers(callback) == {}
    internals.skip_last_hparams(callback, "trial")
    assert callback._trial_result == {"trial": {}}
    assert "_trial_result" in inspect.getsource(TBXLoggerCallback.log_trial_end)  # where Ray reads it back


def test_the_controller_fix_replaces_the_handler_it_was_written_for(monkeypatch):
    assert {"_actor_failed", "_trial_task_failure"} <= set(vars(TuneController))
    assert list(inspect.signature(TuneController._trial_task_failure).parameters) == ["self", "trial", "exception"]
    assert {"_resetting_trials", "_trial_to_actor"} <= set(re.findall(r"self\.(\w+)\s*[:=]",
                                                                      inspect.getsource(TuneController.__init__)))
    monkeypatch.setattr(TuneController, "_trial_task_failure", TuneController._trial_task_failure)
    internals.fix_requeued_trial_failure()
    assert TuneController._trial_task_failure is internals._trial_task_failure


def test_token_authentication_for_an_explicit_address_is_reached_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    internals.use_token_if_available()  # Ray's helper where it was, taking the argument it took; no token here


@pytest.mark.parametrize("pin", ["ray[tune]>=2.60,<2.61", "optuna>=4.0,<5.1"])
def test_the_pins_these_were_read_from_are_the_projects(pin):
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"{pin}"' in pyproject and pin in (Path(internals.__file__)).read_text()
