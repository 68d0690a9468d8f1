"""Checkpoints under faults (issue 42): a stop that lands while a trial copies its checkpoint into
storage leaves no torn folder; finalize and --resume read only the checkpoints Ray registered, and a
registered one that will not load is named and done without."""
import contextlib
import io
import json
import shutil

import pandas as pd
import pytest
import ray
import torch

import slow_save
from conftest import RAY_CPUS
from search.engine.checkpoints import registered, results, unregistered
from search.run import run_search
from search.final.pipeline import finalize, remove_unused_checkpoints
from search.options import FinalizeOptions, SearchOptions
from trainables.trainable import CHECKPOINT_FILE

BUDGET = 25  # seconds: every trial reports its first epoch well within it, then hangs in its second save


@pytest.fixture(scope="module")
def stopped_while_saving(tmp_path_factory, pneumonia_npz):
    """Two trials of 3 epochs each; the copy of each one's second checkpoint hangs half-written when the
    time budget stops the search. Returns the experiment folder, the save log and the console."""
    root = tmp_path_factory.mktemp("torn")
    log, armed = root / "saves.jsonl", root / "armed"
    armed.touch()
    ray.cloudpickle.register_pickle_by_value(slow_save)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=RAY_CPUS, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": slow_save.hook(str(log), str(armed))})
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console):
            folder = run_search(SearchOptions(space="tiny", data=str(pneumonia_npz), storage=str(root / "exp"), stop_rule=False,
                                              name="cut", num_samples=2, max_epochs=3, grace_period=3, folds=1,
                                              image_size=28, subset=400, seed=0, cpus_per_trial=1,
                                              time_budget=BUDGET, finalize=False))
    finally:
        ray.shutdown()
        armed.unlink()
    return folder, [json.loads(line) for line in log.read_text().splitlines()], console.getvalue()


def _trials(folder):
    return sorted(folder.glob("trial_*"))


def test_a_stop_in_the_middle_of_a_save_leaves_no_torn_checkpoint(stopped_while_saving):
    folder, saves, console = stopped_while_saving
    halves = sorted(e["checkpoint"] for e in saves if e["event"] == "half")
    assert halves == sorted(str(t / "checkpoint_000001") for t in _trials(folder)), saves  # each trial was in mid-copy
    assert not [e for e in saves if e["event"] == "done"]  # and was killed there
    assert "removed 2 checkpoint folder(s) the stop cut short" in console, console
    for trial in _trials(folder):
        assert [c.name for c in trial.glob("checkpoint_*")] == ["checkpoint_000000"]
        assert [c.name for c in registered(trial)] == ["checkpoint_000000"]
        torch.load(trial / "checkpoint_000000" / CHECKPOINT_FILE, weights_only=True)  # whole


def test_finalize_reads_registered_checkpoints_and_names_one_that_will_not_load(stopped_while_saving, tmp_path,
                                                                                  capsys):
    """(1) a half-written unregistered folder beside a trial's real checkpoint: finalize goes on from
    the real one; (2) the best trial's registered checkpoint cut in half: one warning line names it and
    that member is trained from scratch."""
    folder = tmp_path / "cut"
    shutil.copytree(stopped_while_saving[0], folder)
    best, other = pd.read_csv(folder / "leaderboard.csv")["trial_id"].astype(str)
    half_written = folder / f"trial_{other}" / "checkpoint_000001"
    shutil.copytree(half_written.with_name("checkpoint_000000"), half_written)
    _cut_in_half(half_written / CHECKPOINT_FILE)
    torn = folder / f"trial_{best}" / "checkpoint_000000" / CHECKPOINT_FILE
    _cut_in_half(torn)
    capsys.readouterr()
    final = finalize(FinalizeOptions(experiment=str(folder), top_k=2, warm_restart="none", bootstrap=50))
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert warnings == [f"warning: checkpoint {torn} cannot be read (PytorchStreamReader failed reading zip archive: "
                        f"failed finding central directory); skipped"], out
    assert f"-{other}: going on from its trial's epoch-1 checkpoint to epoch 3" in out
    assert f"-{best}: going on from" not in out
    metrics = json.loads((final / "metrics.json").read_text())
    members = {m["trial_id"]: m for m in metrics["models"].values() if m["kind"] == "member"}
    assert set(members) == {best, other}
    # the torn folder Ray never registered is gone after finalize; a whole unregistered one stays
    assert all(not unregistered(trial) for trial in _trials(folder))
    whole = folder / f"trial_{other}" / "checkpoint_000002"
    shutil.copytree(folder / f"trial_{other}" / "checkpoint_000000", whole)
    remove_unused_checkpoints(folder, pd.read_csv(folder / "leaderboard.csv"), keep={best, other})
    assert whole.is_dir()


def test_resume_trains_a_trial_whose_checkpoint_is_torn_or_gone_again_and_every_trial_ends_once(stopped_while_saving,
                                                                                                tmp_path, capsys):
    """One trial's checkpoint cut in half; the other's folder gone, as a driver killed between Ray
    deleting its older checkpoint and saving its state leaves it (Ray would fail that trial)."""
    folder = tmp_path / "cut"
    shutil.copytree(stopped_while_saving[0], folder)
    torn_trial, lost_trial = _trials(folder)
    torn = torn_trial / "checkpoint_000000" / CHECKPOINT_FILE
    _cut_in_half(torn)
    shutil.rmtree(lost_trial / "checkpoint_000000")
    capsys.readouterr()
    run_search(SearchOptions(name="cut", storage=str(tmp_path), resume=True, finalize=False))
    out = capsys.readouterr().out
    assert f"warning: trial {torn_trial.name[6:]}: checkpoint {torn} cannot be read" in out, out
    assert f"warning: {lost_trial / 'checkpoint_000000'} is gone" in out, out
    assert out.count("trained again from epoch 0 to its epoch 1") == 2, out
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 2 and board["trial_id"].is_unique and (board["status"] == "TERMINATED").all()
    assert (board["epochs"] == 3).all()
    for trial in _trials(folder):
        assert [r["training_iteration"] for r in results(trial)] == [1, 2, 3]  # each epoch reported once
    study = pd.read_csv(folder / "optuna_trials.csv")
    ran = study[study["state"] != "WAITING"]  # the third backbone's enqueued first trial never ran (2 trials)
    assert sorted(ran["user_attrs_ray_trial_id"]) == sorted(board["trial_id"]) and (ran["state"] == "COMPLETE").all()


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
