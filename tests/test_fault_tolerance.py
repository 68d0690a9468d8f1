"""Scale-out and failures on this machine: the cluster configs validate, the core budget and a
trial's resources on a multi-node cluster, a storage that runs low, a copied search cut again and
again, and a diverging trial that fails alone. Node losses, killed workers and drivers together:
test_soak.py."""
import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from search.run import run_search
from search.options import SearchOptions

SEARCH = ["--space", "tiny", "--image-size", "28", "--subset", "400", "--folds", "1", "--grace-period", "1", "--no-stop-rule",
          "--cpus-per-trial", "1",
          "--no-finalize", "--seed", "0"]


def _results(folder) -> dict[str, list[dict]]:
    """Every trial's reported epochs, from the result.json files Ray Tune wrote."""
    out = {}
    for trial in sorted(folder.glob("trial_*")):
        path = trial / "result.json"
        if path.is_file():
            out[trial.name[len("trial_"):]] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_passes_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(config))
    install = 'python3 -m venv .venv && .venv/bin/pip install --compile -e ".[test]"'
    assert any(install in command for command in config["setup_commands"])  # the README's own install
    assert config["file_mounts"] == {"~/lung-search": "."}
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        # every node has the cluster's one token before `ray start`, so token authentication holds throughout
        copies = [i for i, c in enumerate(commands) if "/mnt/shared/.ray_auth_token ~/.ray/auth_token" in c]
        starts = [i for i, c in enumerate(commands) if "ray start" in c]
        assert copies and starts and copies[0] < starts[0], commands
    broken = {**config, "setup_comands": config["setup_commands"]}  # a typo Ray's schema rejects
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(broken))


def test_aws_cluster_autoscales_gpu_workers_onto_shared_storage():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("/mnt/shared" in command for command in config["setup_commands"])
    assert config["provider"]["type"] == "aws"


@pytest.fixture
def cluster():
    """A Ray cluster of three nodes on this machine: a head and two workers, one CPU each."""
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


@pytest.mark.own_ray
def test_the_core_budget_lives_on_the_drivers_node_and_its_loss_fails_no_trial(cluster):
    """The actor that shares idle cores sits on the driver's node even when that node's CPUs are
    taken (left to Ray, it went to a worker, and killing that worker failed every trial); should it
    be lost anyway, trials read the CPUs they asked for."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from search.engine.cores import core_budget, share_among_tasks
    from trainables.trainable import allowed_threads
    c, _ = cluster
    ray.init(address=c.address, log_to_driver=False)
    try:
        here = ray.get_runtime_context().get_node_id()
        trial = ray.remote(num_cpus=1)(lambda: time.sleep(60))  # holds the driver's node's one CPU, as a trial does
        busy = trial.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        time.sleep(1)
        budgets = [core_budget()[1] for _ in range(4)] + [core_budget("cores-run")[1]]
        nodes = ray.get([b.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for b in budgets])
        assert set(nodes) == {here}
        budgets[-1].set.remote({"a": 2})
        assert allowed_threads(budgets[-1], "a", 1) == 2 and allowed_threads(budgets[-1], "b", 1) == 1
        _, same_name = core_budget("cores-run")  # another search of the same --name on this cluster
        assert allowed_threads(same_name, "a", 1) == 1
        ray.kill(budgets[-1])  # takes effect a moment later
        deadline = time.time() + 30
        while allowed_threads(budgets[-1], "a", 1) == 2 and time.time() < deadline:
            time.sleep(0.2)
        assert allowed_threads(budgets[-1], "a", 1) == 1
        share_among_tasks(budgets[-1], {"a"}, 1)  # finalize's driver loop goes on without it
        ray.cancel(busy, force=True)
    finally:
        ray.shutdown()


@pytest.mark.own_ray
def test_a_cluster_where_no_node_fits_a_trial_waits_for_one_then_stops_with_one_line(cluster):
    """No autoscaler here: the search asks for a node, waits, and stops with one line instead of
    leaving its trials pending for ever; with such a node there, it goes on at once."""
    import ray
    from search.engine.cluster import check_fits
    from core.errors import UserError
    c, _ = cluster
    ray.init(address=c.address, log_to_driver=False)
    try:
        with pytest.raises(UserError, match=r"no node that can run a trial with 2 CPU and 0 GPU joined in 3 s \(nodes: "
                                            r"CPU 1, GPU 0; CPU 1, GPU 0; CPU 1, GPU 0\); a cluster without an autoscaler"):
            check_fits(2, 0, task="run a trial", flags="--cpus-per-trial", cluster=True, wait=3)
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        started = time.time()
        check_fits(2, 0, task="run a trial", flags="--cpus-per-trial", cluster=True, wait=120)
        assert time.time() - started < 10
    finally:
        ray.shutdown()


def _diverging(trial, *, backbones, stages, pretrained):
    """small_cnn, once with a learning rate no network survives (module level: Ray pickles it)."""
    trial.suggest_float("lr", 1e-4, 1e8, log=True)
    trial.suggest_categorical("optimizer", ["adam", "sgd"])
    return {"backbone": "small_cnn", "weights": "random"}


SMALL_DISK = """import os, shutil
from pathlib import Path
_real, _root, _size = shutil.disk_usage, os.environ["SMALL_DISK_ROOT"], int(os.environ["SMALL_DISK_BYTES"])

def disk_usage(path):
    if not os.path.realpath(path).startswith(_root):
        return _real(path)
    used = sum(f.stat().st_size for f in Path(_root).rglob("*") if f.is_file())
    return shutil._ntuple_diskusage(_size, used, max(0, _size - used))

shutil.disk_usage = disk_usage
"""


def test_a_search_whose_storage_runs_low_stops_whole_and_resumes_from_a_copy_on_a_roomy_disk(tmp_path, pneumonia_npz):
    """A 12 MB storage: the search stops while it can still write its state whole (one error line,
    no traceback, exit 2); its copy on a roomy disk resumes and runs every trial once to the end. The
    small disk is the file system's own accounting, as a 12 MB tmpfs would report it, for the folder
    (a `sitecustomize` in every process of the search): no mount, so any user runs this test."""
    small = tmp_path / "small"
    small.mkdir()
    (tmp_path / "small_disk").mkdir()
    (tmp_path / "small_disk" / "sitecustomize.py").write_text(SMALL_DISK)
    args = [*SEARCH, "--data", str(pneumonia_npz), "--backbones", "small_cnn", "--num-samples", "4", "--max-epochs", "3",
            "--max-concurrent", "1", "--name", "full"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    on_small = {**env, "PYTHONPATH": f"{tmp_path / 'small_disk'}:{ROOT}", "SMALL_DISK_ROOT": str(small.resolve()),
                "SMALL_DISK_BYTES": str(12 * 2 ** 20)}
    run = subprocess.run([sys.executable, "-m", "search.run", *args, "--storage", str(small)], cwd=ROOT, env=on_small,
                         capture_output=True, text=True, timeout=600)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1, (run.stdout + run.stderr)[-3000:]
    assert "less than the" in errors[0] and "--resume --name full" in errors[0]
    assert "Traceback" not in run.stdout + run.stderr
    shutil.copytree(small / "full", tmp_path / "roomy" / "full")
    resumed = subprocess.run([sys.executable, "-m", "search.run", *args, "--storage", str(tmp_path / "roomy"), "--resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    board = pd.read_csv(tmp_path / "roomy" / "full" / "leaderboard.csv")
    assert len(board) == 4 and (board["status"] == "TERMINATED").all(), board
    for trial_id, epochs in _results(tmp_path / "roomy" / "full").items():
        # continued from its checkpoint: at most the epoch in flight at the stop runs again (its result reached
        # Ray, its checkpoint not yet), once
        reported = [e["training_iteration"] for e in epochs]
        assert sorted(set(reported)) == list(range(1, max(reported) + 1)), (trial_id, reported)
        assert len(reported) - len(set(reported)) <= 1, (trial_id, reported)


def test_a_diverging_trial_fails_with_its_reason_and_the_search_goes_on(tmp_path, pneumonia_npz, monkeypatch):
    from spaces import _registry
    monkeypatch.setattr(_registry, "_SPACES", dict(_registry._SPACES))  # the test's space leaves with it
    points = ({"lr": 1e8, "optimizer": "sgd"}, {"lr": 1e-3, "optimizer": "adam"}, {"lr": 3e-3, "optimizer": "adam"})
    _registry.register_space("diverging", backbones=("small_cnn",), points=points, fixed=True)(_diverging)
    folder = run_search(SearchOptions(space="diverging", data=str(pneumonia_npz), storage=str(tmp_path), name="nan", folds=1, stop_rule=False,
                                      num_samples=3, max_epochs=2, grace_period=2, image_size=28, subset=300,
                                      cpus_per_trial=1, max_retries=1, finalize=False))
    board = pd.read_csv(folder / "leaderboard.csv")
    failed = board[board["status"] == "ERROR"]
    assert len(failed) == 1 and failed["lr"].iloc[0] == 1e8
    assert "FloatingPointError" in failed["error"].iloc[0] and "diverged" in failed["error"].iloc[0]
    finished = board[board["status"] == "TERMINATED"]
    assert len(finished) == 2 and finished["val_auc"].notna().all() and (finished["epochs"] == 2).all()
    study = pd.read_csv(folder / "optuna_trials.csv")
    assert (study["state"] == "FAIL").sum() == 1


def test_a_copied_search_cut_again_and_again_resumes_into_the_copy_and_asha_judges_it_as_if_uninterrupted(
        tmp_path, pneumonia_npz, capsys):
    """One trial at a time (so the order of results is fixed by the seed): the same search run
    whole, and cut by --time-budget, copied to another storage, then resumed there and cut again
    until it ends, ends with the same trials stopped at the same rungs; the cut trials continue from
    their checkpoints, and the original's files are not touched. ASHA's rungs must travel with the
    experiment (Ray restores no scheduler) and be the latest ones at every resume. With --mlflow, each
    trial keeps one MLflow run through the cuts, and the copy's store writes into the copy."""
    base = dict(space="tiny", data=str(pneumonia_npz), stop_rule=False, subset=200, image_size=28, folds=1, max_epochs=3,
                grace_period=1, num_samples=6, max_concurrent=1, cpus_per_trial=1, seed=0, finalize=False,
                mlflow="experiment")
    whole_folder = run_search(SearchOptions(**base, storage=str(tmp_path / "a"), name="whole"))
    whole = pd.read_csv(whole_folder / "leaderboard.csv")
    budget = json.loads((whole_folder / "timings.json").read_text())["fit_seconds"] * 0.35
    original = run_search(SearchOptions(**base, storage=str(tmp_path / "a"), name="cut", time_budget=budget))
    copy = tmp_path / "b" / "cut"
    shutil.copytree(original, copy)
    untouched = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}

    def progress(board):
        return int(board["epochs"].sum()), int((board["status"] == "TERMINATED").sum())

    boards = [pd.read_csv(copy / "leaderboard.csv")]
    while not (len(boards[-1]) == 6 and (boards[-1]["status"] == "TERMINATED").all()):
        assert len(boards) < 12, [progress(b) for b in boards]
        run_search(SearchOptions(**base, storage=str(tmp_path / "b"), name="cut", resume=True, time_budget=budget))
        boards.append(pd.read_csv(copy / "leaderboard.csv"))
        if progress(boards[-1]) == progress(boards[-2]):
            budget *= 1.5  # this machine needs longer to restore than to make progress
    assert len(boards) >= 3, [progress(b) for b in boards]  # cut at least twice before the end

    def outcome(board):
        return sorted(zip(board["backbone"], board["lr"].round(10), board["epochs"], board["stopped_early"]))

    assert outcome(boards[-1]) == outcome(whole)
    results = _results(copy)
    cut_trials = {t for b in boards[:-1] for t in b.loc[b["status"] == "INTERRUPTED", "trial_id"]}
    assert cut_trials
    for trial_id in cut_trials:
        epochs = [row["epoch"] for row in results[trial_id]]
        # continued from its checkpoint, not started again: at most the epoch in flight when the search was cut
        # (its result reached Ray, its checkpoint not yet, or the other way round) runs again, once per cut
        cuts = sum(trial_id in set(b.loc[b["status"] == "INTERRUPTED", "trial_id"]) for b in boards[:-1])
        assert sorted(set(epochs)) == list(range(1, max(epochs) + 1)) and len(epochs) - len(set(epochs)) <= cuts, epochs
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == untouched
    _one_mlflow_run_per_trial(copy, boards[-1])
    _hparams_at_the_best_epoch(copy, boards[-1])
    _a_state_file_cut_short_is_one_line(copy, capsys)


def _a_state_file_cut_short_is_one_line(folder, capsys):
    """A state file a full disk cut short: --resume says which, in one line, and does not wait forever."""
    from search.run import main
    state = max(folder.glob("searcher-state-*.pkl"))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    code = main(["--resume", "--name", folder.name, "--storage", str(folder.parent)])
    cut = capsys.readouterr()
    errors = [line for line in cut.err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and state.name in errors[0], (cut.out + cut.err)[-3000:]
    assert "--warm-start" in errors[0]


def _one_mlflow_run_per_trial(folder, board):
    """One run per trial (none started again by a resume) under one parent: its config as parameters,
    one value per epoch it ran, ASHA's stops tagged; the parent's leaderboard artifact in the folder."""
    from mlflow.tracking import MlflowClient

    from search.engine.tracking import tracking_uri
    client = MlflowClient(tracking_uri(folder, "experiment"))
    runs = client.search_runs([client.get_experiment_by_name(folder.name).experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "search"]
    by_trial = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    assert len(parents) == 1 and len(runs) == len(by_trial) + 1 == len(board) + 1
    assert set(by_trial) == set(board["trial_id"])
    assert board["stopped_early"].any() and not board["stopped_early"].all()  # both kinds of tag are checked
    for row in board.to_dict("records"):
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params["backbone"] == row["backbone"] and float(run.data.params["lr"]) == pytest.approx(row["lr"])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_auc"))
        assert steps == list(range(1, row["epochs"] + 1)), (row["trial_id"], steps)
        assert run.data.tags["stopped_early"] == str(bool(row["stopped_early"])).lower()
        assert run.data.tags.get("stopped_at_epoch") == (str(row["epochs"]) if row["stopped_early"] else None)
    logged = [a.path for a in client.list_artifacts(parents[0].info.run_id, "search")]
    assert "search/leaderboard.csv" in logged, logged
    assert list((folder / "mlflow-artifacts").rglob("leaderboard.csv"))  # in the copy, not the original


def _hparams_at_the_best_epoch(folder, board):
    """TensorBoard's HParams entry of each trial names `best/<metric>`, and those scalars hold the
    leaderboard's best epoch and value (over every run of the trial), not the last epoch's."""
    import struct

    from tensorboardX.proto import event_pb2
    for row in board.to_dict("records"):
        scalars, hparams = {}, b""
        for path in sorted((folder / f"trial_{row['trial_id']}").glob("events.out.tfevents.*")):
            data, at = path.read_bytes(), 0
            while at < len(data):  # TFRecord: length, its CRC, the event, its CRC
                (length,) = struct.unpack("<Q", data[at:at + 8])
                event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
                at += 16 + length
                for value in event.summary.value:
                    if value.tag.startswith("_hparams_"):
                        hparams += value.metadata.plugin_data.content
                    else:
                        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
        assert b"best/val_auc" in hparams and b"ray/tune/val_auc" not in hparams, row["trial_id"]
        [(epoch, value)] = scalars["best/val_auc"]
        assert epoch == row["best_epoch"] and value == pytest.approx(row["val_auc"], abs=1e-6)
        assert scalars["best/epoch"] == [(epoch, float(epoch))]
