"""The benchmark scripts' own arithmetic, on a real (small) search: a regression here would make
BENCHMARKS.md report wrong shares and compute counts."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from bench.asha_vs_fifo import epochs_in_order, reach
from bench.overhead import breakdown
from conftest import ROOT
from search.run import run_search
from search.options import SearchOptions


@pytest.fixture(scope="module")
def fifo_search(tmp_path_factory, pneumonia_npz):
    return run_search(SearchOptions(space="tiny", data=str(pneumonia_npz), stop_rule=False, num_samples=3, max_epochs=2, folds=1,
                                    subset=200, image_size=28, scheduler="fifo", finalize=False,
                                    storage=str(tmp_path_factory.mktemp("bench")), name="fifo"))


def test_overhead_breakdown_accounts_for_every_slot_second(fifo_search):
    table, summary = breakdown(fifo_search)
    timings = json.loads((fifo_search / "timings.json").read_text())
    assert timings["trial_slots"] == 2  # the tests' shared Ray has 2 CPUs
    # the parts add up to slots x wall by construction; what can go wrong is a part counted twice, which
    # leaves another negative
    assert (table["slot-seconds"] >= -0.5).all(), table  # rounded to 0.1 s
    seconds = dict(zip(table["component"], table["slot-seconds"]))
    assert seconds["training steps"] > 0 and seconds["evaluation steps"] > 0
    assert summary["trials"] == 3 and summary["trial_epochs"] == 6
    assert 0 < summary["in_steps_share"] < summary["in_steps_share_of_fit"] <= 1


def test_compute_to_reach_counts_trial_epochs_in_finishing_order(fifo_search):
    frame = epochs_in_order(fifo_search)
    board = pd.read_csv(fifo_search / "leaderboard.csv")
    assert len(frame) == board["epochs"].sum() == 6
    assert frame["finished"].is_monotonic_increasing
    best = frame["val_auc"].max()
    epochs, seconds = reach(frame, best, frame["finished"].min() - 1)
    assert epochs == int(frame.index[frame["val_auc"] == best][0]) + 1 and seconds >= 1
    assert reach(frame, best + 0.01, 0) == (None, None)


def test_throughput_script_compares_the_trial_loop_with_every_bare_loop(tmp_path):
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "bench.throughput", "--sets", "resnet18:32", "--steps", "2", "--warmup",
                             "1", "--repeats", "1", "--no-compile"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (csv,) = tmp_path.glob("throughput-*.csv")
    table = pd.read_csv(csv)
    assert table["loop"].iloc[0].startswith("trial loop (") and list(table["loop"].iloc[1:]) == [
        "bare fp32/contiguous", "bare fp32/channels_last", "bare bf16/contiguous", "bare bf16/channels_last"]
    assert (table["images/s (median)"] > 0).all() and (table["fastest bare"] == "yes").sum() == 1
    fastest = table.loc[table["fastest bare"] == "yes", "images/s (median)"].item()
    assert table["trial loop / this"].iloc[0] == 1.0 and table.loc[table["fastest bare"] == "yes", "trial loop / this"].item() \
        == pytest.approx(table["images/s (median)"].iloc[0] / fastest, abs=2e-3)
    bad = subprocess.run([sys.executable, "-m", "bench.throughput", "--sets", "nonet:32"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'nonet' is neither a space" in bad.stderr


def test_a_benchmark_row_names_a_clean_commit_and_refuses_a_dirty_tree(tmp_path):
    from bench.common import provenance

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "rows.csv").write_text("a\n1\n")  # the benchmarks' own rows: not a change
    row = provenance(root=tmp_path)
    assert "+" not in row["commit"] and len(row["commit"]) >= 7 and row["cores"] == os.cpu_count()
    assert row["cpu"] and "torch " in row["versions"] and "ray " in row["versions"]
    (tmp_path / "code.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("y = 1\n")
    with pytest.raises(SystemExit, match=r"changes no commit holds \(code\.py, new\.py\).*--allow-dirty"):
        provenance(root=tmp_path)
    assert provenance(root=tmp_path, allow_dirty=True)["commit"] == row["commit"] + "+changes"


def test_selection_rules_train_each_trial_again_to_the_network_it_reported(fifo_search):
    from bench.selection_rules import epochs_of, model_at, pick
    from search.final.pipeline import _search_data
    from search.outputs.records import read_search_record
    trials = epochs_of(fifo_search).set_index("trial_id", drop=False)
    board = pd.read_csv(fifo_search / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert sorted(trials.index) == sorted(board.index)
    assert trials["peak_auc"].to_dict() == pytest.approx(board["val_auc"].to_dict())  # what the leaderboard ranks by
    assert trials["best_epoch"].to_dict() == board["best_epoch"].to_dict()
    data = _search_data(read_search_record(fifo_search), None)
    trial = trials.iloc[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # none of the trials ran on 3: each epoch must run on the trial's own threads
        for epoch in (1, 2):  # epoch 2: its last checkpoint; epoch 1: trained again from scratch
            assert model_at(fifo_search, trial["trial_id"], epoch, data)["val_auc"] == pytest.approx(
                trial["by_epoch"][epoch], abs=1e-6)
    finally:
        torch.set_num_threads(threads)
    chosen, epoch = pick(trials, "peak_best")
    assert chosen["trial_id"] == board.index[0] and epoch == board["best_epoch"].iloc[0]
    assert pick(trials, "peak_last")[1] == 2 and pick(trials, "last")[0]["last_auc"] == trials["last_auc"].max()
