"""Integration: real Ray Tune + Optuna + ASHA searches on the shared real data, on the CPU."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, SHARED_DATA
from search.run import run_search
from search.options import SearchOptions

# one validation split (the small subsets would be cross-validated by --folds auto; test_finalize covers that);
# every trial run (the stop rule has its own test below)
SMALL = dict(storage=None, max_epochs=3, grace_period=1, image_size=28, cpus_per_trial=1, seed=0, finalize=False,
             folds=1, stop_rule=False)


def _run(tmp_path, **options):
    return run_search(SearchOptions(**{**SMALL, "storage": str(tmp_path), **options}))


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory, pneumonia_npz):
    folder = _run(tmp_path_factory.mktemp("exp"), space="tiny", data=str(pneumonia_npz), num_samples=8,
                  subset=600, name="tiny")
    return folder, pd.read_csv(folder / "leaderboard.csv")


def test_leaderboard_has_one_row_per_trial_sorted_by_the_metric(tiny_search):
    folder, board = tiny_search
    assert len(board) == 8 and board["trial_id"].is_unique
    assert list(board["rank"]) == list(range(1, 9))
    assert board["val_auc"].is_monotonic_decreasing
    assert (board["status"] == "TERMINATED").all()
    for column in ("backbone", "lr", "dropout", "optimizer", "augment", "weights", "image_size", "val_acc", "val_f1",
                   "val_loss", "best_epoch", "epochs", "stopped_early", "wall_seconds", "params_m"):
        assert column in board and board[column].notna().all(), column
    assert board["val_auc"].iloc[0] > 0.9  # real X-rays: even a tiny budget separates the classes


def test_a_cheap_first_rung_trains_and_judges_every_trial_at_one_size_then_promotes_at_full_size(tmp_path, pneumonia_npz):
    folder = _run(tmp_path, space="tiny", data=str(pneumonia_npz), num_samples=4, subset=300, name="early", early_size=16)
    record = json.loads((folder / "search_config.json").read_text())
    assert record["options"]["early_size"] == 16
    epochs = [json.loads(line) for path in folder.glob("trial_*/result.json") for line in path.read_text().splitlines()]
    sizes = {}
    for e in epochs:
        sizes.setdefault(e["training_iteration"], set()).add(e["input_size"])
        assert e["config"]["early_size"] == 16 and e["config"]["early_epochs"] == 1
    assert sizes[1] == {16} and sizes.get(2, {28}) == {28} and sizes.get(3, {28}) == {28} and len(sizes) >= 2
    execution = json.loads((folder / "timings.json").read_text())["execution"]
    assert execution and all(v.split("/")[0] in ("fp32", "bf16") for v in execution.values())
    assert any(k.endswith(" 16px") for k in execution) and any(k.endswith(" 28px") for k in execution)


def test_asha_stops_some_trials_early(tiny_search):
    _, board = tiny_search
    stopped = board[board["stopped_early"]]
    assert len(stopped) >= 2
    assert (stopped["epochs"] < 3).all()
    assert (board.loc[~board["stopped_early"], "epochs"] == 3).all()


def test_the_kept_study_holds_every_trial_as_the_leaderboard_ranks_it(tiny_search):
    """Every ASHA-stopped trial reaches Optuna as PRUNED with its score at the epoch it stopped (Ray
    never passes that result to the searcher on its own); a finished one as COMPLETE with its best
    epoch's score. Read from optuna.journal with Optuna's own API."""
    from search.engine.tuner import load_study
    folder, board = tiny_search
    study = {t.user_attrs["ray_trial_id"]: t for t in load_study(folder).trials}
    assert set(study) == set(board["trial_id"])
    for row in board.to_dict("records"):
        trial = study[row["trial_id"]]
        epochs = [json.loads(line) for line in (folder / f"trial_{row['trial_id']}" / "result.json").read_text().splitlines()]
        assert trial.intermediate_values == {e["training_iteration"]: e["val_auc"] for e in epochs}
        if row["stopped_early"]:
            assert trial.state.name == "PRUNED" and max(trial.intermediate_values) == row["epochs"] < 3
        else:
            assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(row["val_auc"])
    table = pd.read_csv(folder / "optuna_trials.csv")
    assert (table["state"] == "PRUNED").sum() == board["stopped_early"].sum() >= 2
    assert (table["state"] == "COMPLETE").sum() == (~board["stopped_early"]).sum()


def test_every_backbone_is_tried_first_at_the_spaces_first_trial_values(tiny_search):
    from spaces.tiny import BACKBONES, first_trial
    _, board = tiny_search
    values = first_trial("small_cnn", pretrained=False)
    first = board[(board["lr"] == values["lr"]) & (board["dropout"] == values["dropout"])]
    assert sorted(first["backbone"]) == sorted(BACKBONES)
    assert (first["optimizer"] == values["optimizer"]).all() and (first["augment"] == values["augment"]).all()


def test_outputs_record_config_versions_and_data_fingerprint(tiny_search, pneumonia_npz):
    folder, board = tiny_search
    record = json.loads((folder / "search_config.json").read_text())
    audit = json.loads((folder / "data_report.json").read_text())
    assert audit["deduped"] and all("[train]" in f for f in audit["deduped"])  # train copies of val images, dropped
    assert record["data"]["counts"] == audit["counts_after_dedupe"]
    assert sum(record["data"]["counts"]["train"].values()) == 600 - len(audit["deduped"])
    assert record["data"]["fingerprint"]
    assert {"torch", "timm", "ray", "optuna"} <= set(record["versions"])
    assert record["options"]["num_samples"] == 8 and record["profile"] == "cpu"
    assert json.loads((folder / "timings.json").read_text())["stop_rule"] == {"on": False}  # --no-stop-rule
    per_backbone = pd.read_csv(folder / "leaderboard_by_backbone.csv")
    assert set(per_backbone["backbone"]) == set(board["backbone"])
    assert per_backbone["trials"].sum() == 8
    assert (folder / "search_progress.png").stat().st_size > 1000


def test_a_warm_started_search_on_other_data_starts_from_the_earlier_trials(tiny_search, tmp_path, png_folder):
    """Warm-started from the tiny search on the .npz: every earlier trial goes to the sampler first,
    no backbone is swept again (so the sampler proposes every trial), and the records say where the
    trials came from and that the data differed."""
    from search.engine.tuner import load_study
    earlier, board = tiny_search
    folder = _run(tmp_path, space="tiny", data=str(png_folder), num_samples=3, subset=60, name="warm",
                  warm_start=[str(earlier), str(earlier)])  # given twice: counted once
    record = json.loads((folder / "search_config.json").read_text())["warm_start"]
    assert record["from"] == [{"experiment": str(earlier), "trials": 8, "given": 8, "same_data": False}]
    assert record["skipped_backbones"] == sorted(set(board["backbone"]))
    study = load_study(folder).trials
    given = [t for t in study if t.user_attrs.get("warm_start_from") == str(earlier)]
    assert len(given) == 8 and {t.user_attrs["ray_trial_id"] for t in given} == set(board["trial_id"])
    new = pd.read_csv(folder / "leaderboard.csv")
    assert len(new) == 3 and not set(new["trial_id"]) & set(board["trial_id"])
    first = board[board["lr"] == 1e-3]["dropout"].iloc[0]
    assert not ((new["lr"] == 1e-3) & (new["dropout"] == first)).any()  # no first trial enqueued again
    assert not any("fixed_params" in t.system_attrs for t in study if "warm_start_from" not in t.user_attrs)


@pytest.mark.parametrize("args,message", [
    (["--space", "backbones"], "that search ran the space 'tiny', this one 'backbones'"),
    (["--space", "tiny", "--metric", "val_loss"], "that search optimised 'val_auc', this one 'val_loss'"),
    (["--space", "recipes"], "--warm-start applies to a space the sampler searches, not the fixed space 'recipes'"),
    (["--space", "tiny", "--image-size", "32", "--max-epochs", "3", "--folds", "1", "--subset", "100"],
     "that search scored its trials differently (image size 28 there, 32 here); their values cannot be compared"),
])
def test_a_warm_start_from_another_space_or_metric_is_refused_with_one_line(tiny_search, tmp_path, pneumonia_npz,
                                                                            capsys, args, message):
    from search.run import main
    earlier, _ = tiny_search
    assert main(["--data", str(pneumonia_npz), "--storage", str(tmp_path), "--warm-start", str(earlier), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert main(["--data", str(pneumonia_npz), "--storage", str(tmp_path), "--space", "tiny",
                 "--warm-start", str(tmp_path)]) == 2
    assert "is not an experiment folder" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_a_warm_start_leaves_out_values_outside_the_current_ranges_and_counts_them(tiny_search):
    from search.engine.warm_start import read_studies, translate
    earlier, board = tiny_search
    (source,) = read_studies([str(earlier), str(earlier) + "/"], space="tiny", metric="val_auc", fingerprint="")

    def narrower(trial):  # the tiny space with a learning-rate range that holds only part of the earlier values
        trial.suggest_categorical("backbone", ["small_cnn", "resnet10t", "mobilenetv3_small_050"])
        trial.suggest_float("lr", 3e-4, 1.1e-3, log=True)
    trials, dropped = translate([source], narrower)
    outside = int((board["lr"] > 1.1e-3).sum())
    assert len(trials) == 8 and dropped == outside > 0
    assert sum("lr" in t.params for t in trials) == 8 - outside


def test_backbones_space_with_real_pretrained_weights(tmp_path, pneumonia_npz):
    """The `backbones` space on real ImageNet weights (installed EfficientNet-Lite0 package): the
    conditional freezing depth and the head's learning-rate ratio are drawn and act. After an epoch a
    trial's frozen parameters are still the ImageNet ones and the others moved; its head trains at
    lr x head_lr_ratio."""
    import torch

    from search.engine.checkpoints import newest_readable
    from trainables.models import build_model
    folder = _run(tmp_path, space="backbones", data=str(pneumonia_npz), backbones="efficientnet_lite0",
                  num_samples=3, max_epochs=1, subset=300, weights="imagenet", name="lite0")
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 3 and (board["status"] == "TERMINATED").all()
    assert board["freeze_depth"].between(0, 5).all() and board["weights"].eq("imagenet").all()
    frozen_share = 1 - board["trainable_params_m"] / board["params_m"]
    assert ((frozen_share > 0) == (board["freeze_depth"] > 0)).all()
    assert (board["freeze_depth"] > 0).any() and board["head_lr_ratio"].nunique() == 3  # drawn, not the plain 10x
    for trial in folder.glob("trial_*"):
        config = json.loads((trial / "params.json").read_text())
        saved, _ = newest_readable(trial)
        trained = saved["folds"][0]
        imagenet = build_model(config, num_classes=2, in_chans=1).backbone
        frozen = {n for n, p in imagenet.named_parameters() if not p.requires_grad}
        assert bool(frozen) == (config["freeze_depth"] > 0)
        moved = {n for n, p in imagenet.named_parameters()
                 if not torch.equal(p.detach(), trained["model"][f"backbone.{n}"])}
        assert moved and not moved & frozen, (config["freeze_depth"], sorted(moved & frozen)[:3])
        rates = [g["initial_lr"] for g in trained["optimizer"]["param_groups"]]
        assert max(rates) == pytest.approx(config["lr"] * config["head_lr_ratio"])
        assert min(rates) == pytest.approx(config["lr"])


def test_search_on_a_folder_of_pngs(tmp_path, png_folder):
    # no --image-size: the CPU profile's "auto" sees files of 28-90 px (median ~59) and picks 64
    folder = _run(tmp_path, space="tiny", data=str(png_folder), num_samples=2, max_epochs=2, name="pngs", dedupe=True,
                  image_size=None, profile="cpu")
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 2 and board["val_auc"].notna().all()
    assert (board["image_size"] == 64).all()
    record = json.loads((folder / "search_config.json").read_text())
    assert record["options"]["image_size"] == 64 and record["data"]["image_shape"] == [64, 64, 1]
    assert record["data"]["class_names"] == ["normal lung", "viral pneumonia"]
    audit = json.loads((folder / "data_report.json").read_text())  # written before training
    assert audit["counts"] == record["data"]["counts"] and audit["deduped"] == [] and audit["warnings"] == []
    assert "## File mode per class" in (folder / "data_report.md").read_text()


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search.run", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _main(capsys, *args):
    """`search.run.main(args)` in this process, as the command line calls it (the tests of the real
    command's exit and start-up use `_cli`)."""
    from search.run import main
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "data path '/no/such/folder' does not exist"),
    (["--space", "nope"], "unknown space 'nope'; known spaces: backbones, grid, lite, plain, recipes, tiny"),
    (["--max-epochs", "0"], "--max-epochs must be positive, got 0"),
    (["--grace-period", "5", "--max-epochs", "2"], "--grace-period 5 exceeds --max-epochs 2"),
    (["--backbones", "resnet5000"], "unknown backbone(s) ['resnet5000']"),
    (["--gpus-per-trial", "1"], "no node can run a trial with 1 CPU and 1 GPU"),
    (["--weights", "imagenet", "--backbones", "resnet18"], "no ImageNet weights reachable for resnet18"),
    (["--sampler", "bogus"], "unknown sampler 'bogus'; choose one of tpe, random, qmc, gp"),
    (["--weights-dir", "/no/dir"], "--weights-dir '/no/dir' is not a folder"),
    (["--reduction-factor", "1"], "--reduction-factor must be at least 2, got 1.0"),
    (["--subset", "1"], "a subset of 1 image(s) per split is too small: keep at least two images per class (--subset)"),
    (["--resume"], "--resume needs --name"),
    (["--resume", "--name", "never-ran"], "never-ran does not exist"),
    (["--space", "recipes", "--backbones", "resnet18"], "--backbones does not apply to the fixed space 'recipes'"),
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--stop-patience", "0"], "--stop-patience must be positive, got 0"),
    (["--early-size", "4"], "--early-size must be 'auto', 0 (off) or a whole number of pixels, 8 or more; got 4"),
    (["--early-size", "32", "--image-size", "32"], "--early-size 32 must be below --image-size 32 (0 turns it off)"),
    (["--scheduler", "hyperband"], "unknown scheduler 'hyperband'; choose one of asha, fifo"),
    (["--space", "recipes", "--recipes", "resnet50_finetune,nope"], "unknown recipe(s) ['nope']; recipes: mobilenetv2"),
    (["--space", "tiny", "--recipes", "resnet50_finetune"], "--recipes applies to --space recipes, not 'tiny'"),
    (["--warm-restart", "twice"], "unknown warm restart 'twice'; choose one of best, all, none"),
    (["--folds", "0"], "--folds must be 'auto' or a whole number, 1 (no cross-validation) or more; got 0"),
    (["--folds", "2000"], "a class of train+val has only"),
    (["--space", "tiny", "--positive-class", "covid"],
     "--positive-class 'covid' is not a class of this data; classes: ['normal', 'pneumonia']"),
    (["--external", "/no/such/set"], "--external '/no/such/set' does not exist"),
    (["--class-map", "a=b"], "--class-map applies to the sets given with --external; none was given"),
    (["--space", "tiny", "--external", str(SHARED_DATA / "pneumoniamnist" / "pneumoniamnist.npz")],
     "is the data the model was trained and tested on (same fingerprint)"),
    (["--mlflow", "ftp://host/x"], "--mlflow 'ftp://host/x' is not a tracking URI; give none"),
    (["--mlflow", "mlruns"], "--mlflow 'mlruns' is not a tracking URI"),
    (["--mlflow", "http://127.0.0.1:9"], "--mlflow http://127.0.0.1:9: the tracking server does not answer"),
])
def test_cli_errors_are_one_clear_line(tmp_path, pneumonia_npz, args, message, capsys):
    """`main` as the command line calls it, in this process (the subprocess tests below run the real
    command): exit status 2, one `error:` line, nothing written."""
    from search.run import main
    base = ["--data", str(pneumonia_npz), "--storage", str(tmp_path), "--num-samples", "1"]
    assert main([*base, *args]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr and not any(tmp_path.iterdir())


def test_a_resumed_search_deletes_the_mlflow_runs_of_trials_it_does_not_hold(tmp_path):
    """A driver killed between starting a trial and recording it leaves a run the resumed search never
    continues (it runs the config again under a new id): deleted, tagged, so each trial keeps one run."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from search.engine.tracking import MlflowTracking, tracking_uri
    first = MlflowTracking(tmp_path, uri="experiment", metric="val_auc")
    first.setup()
    for tid in ("kept", "orphan"):
        first.on_trial_start(0, [], SimpleNamespace(trial_id=tid, config={"lr": 0.1}))
    resumed = MlflowTracking(tmp_path, uri="experiment", metric="val_auc")
    resumed.setup()
    resumed.on_step_begin(0, [SimpleNamespace(trial_id="kept"), SimpleNamespace(trial_id="new")])
    resumed.on_step_begin(1, [SimpleNamespace(trial_id="new")])  # checked once, when the search resumes
    client = MlflowClient(tracking_uri(tmp_path, "experiment"))
    experiment = client.get_experiment_by_name(tmp_path.name).experiment_id
    assert sorted(r.data.tags.get("trial_id", "parent") for r in client.search_runs([experiment])) == ["kept", "parent"]
    [gone] = client.search_runs([experiment], run_view_type=2)  # ViewType.DELETED_ONLY
    assert gone.data.tags["trial_id"] == "orphan" and gone.data.tags["orphaned"] == "true"
    assert set(resumed.run_ids) == {"kept"}


def _without_mlflow(monkeypatch):
    """As where the tracking extra is not installed: also its submodules an earlier test imported,
    which Python would otherwise hand out from sys.modules without importing `mlflow` itself."""
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_mlflow_without_mlflow_installed_says_what_to_install(tmp_path, pneumonia_npz, capsys, monkeypatch):
    from search.run import main
    _without_mlflow(monkeypatch)
    assert main(["--data", str(pneumonia_npz), "--storage", str(tmp_path), "--mlflow"]) == 2
    assert "error: --mlflow needs MLflow: pip install 'lung-search[tracking]'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_outputs_mlflow_cannot_take_leave_one_warning_and_the_files(tmp_path, monkeypatch):
    """Finalize of a --mlflow search on a machine without MLflow: the report is written, one warning."""
    from search.engine.tracking import log_outputs
    (tmp_path / "leaderboard.csv").write_text("rank\n")
    _without_mlflow(monkeypatch)
    with pytest.warns(UserWarning, match=r"MLflow \(experiment\) did not take search/ \(ModuleNotFoundError"):
        log_outputs(tmp_path, "experiment", [("search", tmp_path / "leaderboard.csv")])
    assert (tmp_path / "leaderboard.csv").read_text() == "rank\n"


def _bad_manifest(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "list.csv").write_text("path,label\nimages/none.png,normal\n")
    return str(tmp_path / "m" / "list.csv")


@pytest.mark.parametrize("args,message", [
    (lambda t: ["--data", str(t / "nowhere")], "does not exist"),
    (lambda t: ["--data", _bad_manifest(t)], "1 listed file(s) do not exist: images/none.png"),
    (lambda t: ["--profile", "cpu", "--grace-period", "9"], "--grace-period 9 exceeds --max-epochs 8"),
    (lambda t: ["--profile", "gpu", "--max-epochs", "2"], "--grace-period 3 exceeds --max-epochs 2"),
    (lambda t: ["--storage", str(t / "a-file" / "below")], "a-file is not a folder; choose another --storage"),
])
def test_bad_paths_manifests_storage_and_profile_clashes_answer_before_ray_starts(tmp_path, pneumonia_npz, capsys,
                                                                                  monkeypatch, args, message):
    from search.engine import experiment
    from search.run import main
    from ingest import sources

    def never(*_, **__):
        raise AssertionError("joined Ray or decoded an image before answering")
    monkeypatch.setattr(experiment, "connected", never)
    monkeypatch.setattr(sources, "decode_files", never)
    (tmp_path / "a-file").write_text("")
    assert main(["--data", str(pneumonia_npz), "--storage", str(tmp_path / "exp"), *args(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "exp").exists()


def test_a_bad_data_path_answers_within_10_seconds_imports_included(tmp_path):
    import time
    started = time.time()
    result = _cli("--data", str(tmp_path / "nowhere"), "--storage", str(tmp_path))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert time.time() - started < 10


def test_cli_refuses_to_overwrite_an_experiment(tmp_path, pneumonia_npz, capsys):
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "leaderboard.csv").write_text("precious\n")
    result = _main(capsys, "--data", str(pneumonia_npz), "--storage", str(tmp_path), "--name", "mine")
    assert result.returncode == 2 and "already exists; pass --resume" in result.stderr
    assert (existing / "leaderboard.csv").read_text() == "precious\n"


def test_cli_names_a_corrupt_image(tmp_path, png_folder, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(png_folder, data)
    (data / "normal lung" / "scan 7.png").write_bytes(b"\x89PNG broken")
    result = _main(capsys, "--data", str(data), "--storage", str(tmp_path / "exp"), "--space", "tiny")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "1 image(s) could not be read" in result.stderr and "scan 7.png" in result.stderr
    assert "--skip-corrupt" in result.stderr
    # no experiment is written before the checks pass; only the decoded images are kept in the cache, so
    # that the run with --skip-corrupt does not decode them again
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["data-cache"]


def test_cli_manifest_group_column_must_exist(tmp_path, capsys):
    from conftest import shared
    result = _main(capsys, "--data", str(shared("covid-ct-ucsd", "patients.csv")), "--group-column", "hospital",
                   "--storage", str(tmp_path))
    assert result.returncode == 2 and "the group column 'hospital' is not a column" in result.stderr


def test_recipes_flag_runs_only_the_named_recipes(tmp_path, pneumonia_npz):
    folder = _run(tmp_path, space="recipes", recipes="small_cnn_scratch", data=str(pneumonia_npz), max_epochs=1,
                  subset=200, weights="random", name="one-recipe")
    board = pd.read_csv(folder / "leaderboard.csv")
    assert board["recipe"].tolist() == ["small_cnn_scratch"] and board["backbone"].tolist() == ["small_cnn"]


def test_unknown_scheduler_in_options_is_a_user_error(tmp_path, pneumonia_npz):
    from core.errors import UserError
    with pytest.raises(UserError, match="unknown scheduler 'median'; choose one of asha, fifo"):
        _run(tmp_path, space="tiny", data=str(pneumonia_npz), scheduler="median")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("size", ["big", 0, 12.5])
def test_bad_image_size_in_options_is_a_user_error(tmp_path, pneumonia_npz, size):
    from core.errors import UserError
    with pytest.raises(UserError, match=f"--image-size must be 'auto' or a whole number of pixels, 8 or more; got {size!r}"):
        _run(tmp_path, space="tiny", data=str(pneumonia_npz), image_size=size)
    assert not any(tmp_path.iterdir())


def test_fifo_runs_every_trial_to_max_epochs_and_timings_match_the_wall_clock(tmp_path, pneumonia_npz):
    import time
    started = time.time()
    folder = _run(tmp_path, space="tiny", data=str(pneumonia_npz), num_samples=3, subset=200, scheduler="fifo",
                  name="fifo")
    wall = time.time() - started
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 3 and (board["epochs"] == 3).all() and not board["stopped_early"].any()
    timings = json.loads((folder / "timings.json").read_text())
    assert timings["trial_slots"] == 2  # the tests' shared Ray has 2 CPUs
    assert board["wall_seconds"].max() <= timings["fit_seconds"] <= timings["search_seconds"] <= wall
    assert 0 < timings["data_seconds"] <= timings["before_fit_seconds"]
    # the three trials' epochs ran inside fit on its 2 slots
    steps = timings["slot_use"]["step_seconds"]
    assert timings["slot_use"]["trial_epochs"] == 9 and 0 < steps <= 2 * timings["fit_seconds"]


def test_folds_auto_cross_validates_small_pools_only():
    from search.options import AUTO_FOLDS, AUTO_FOLDS_BELOW, resolve_folds
    assert resolve_folds("auto", 251) == AUTO_FOLDS == 5  # covid19-xray-3class
    assert resolve_folds("auto", AUTO_FOLDS_BELOW) == 1 and resolve_folds("auto", 2698) == 1  # pneumoniamnist
    assert resolve_folds(3, 100_000) == 3 and resolve_folds(1, 50) == 1


def test_with_no_data_anywhere_the_search_runs_on_the_packaged_default(tmp_path, monkeypatch, pneumonia_npz):
    """No --data, no $SEARCH_DATA, no MedMNIST download: the PneumoniaMNIST copy in the package,
    the same file as the shared one."""
    import hashlib

    from search.data.search_data import PACKAGED_DATA, data_path
    monkeypatch.delenv("SEARCH_DATA", raising=False)
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "no-medmnist-here"))
    assert data_path(None) == PACKAGED_DATA
    assert hashlib.sha256(PACKAGED_DATA.read_bytes()).digest() == hashlib.sha256(pneumonia_npz.read_bytes()).digest()
    folder = _run(tmp_path, space="tiny", data=None, num_samples=1, max_epochs=1, subset=60, name="packaged")
    record = json.loads((folder / "search_config.json").read_text())
    assert record["data"]["source"] == f"npz:{PACKAGED_DATA}" and len(pd.read_csv(folder / "leaderboard.csv")) == 1


@pytest.mark.parametrize("profile,args,message", [
    ("gpu", ["--max-epochs", "1"], "--grace-period 3 exceeds --max-epochs 1 (--grace-period 3 from the gpu profile"),
    ("gpu", ["--grace-period", "31"], "--grace-period 31 exceeds --max-epochs 30 (--max-epochs 30 from the gpu profile"),
    ("cpu", ["--grace-period", "9"], "--grace-period 9 exceeds --max-epochs 8 (--max-epochs 8 from the cpu profile"),
    ("cpu", ["--max-epochs", "0"], "--max-epochs must be positive, got 0"),
    ("gpu", ["--reduction-factor", "1.5"], "--reduction-factor must be at least 2, got 1.5"),
    ("gpu", ["--gpus-per-trial", "1.5"], "--gpus-per-trial above 1 must be a whole number, got 1.5"),
    ("cpu", ["--cpus-per-trial", "0"], "--cpus-per-trial must be positive, got 0.0"),
    ("gpu", ["--time-budget", "-5"], "--time-budget must be positive, got -5.0"),
    ("gpu", [], "no node can run a trial with 4 CPU and 1 GPU"),
])
def test_flags_that_clash_with_a_profile_are_one_clear_line(tmp_path, pneumonia_npz, capsys, profile, args, message):
    from search.run import main
    assert main(["--data", str(pneumonia_npz), "--storage", str(tmp_path), "--profile", profile, *args]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr and not any(tmp_path.iterdir())


def test_warnings_are_one_clean_line(tmp_path, png_folder, capsys):
    import shutil

    from search.run import main
    data = tmp_path / "data"
    shutil.copytree(png_folder, data)
    (data / "normal lung" / "scan 7.png").write_bytes(b"\x89PNG broken")
    # stops after loading (a bad --positive-class), so the warning is the only thing it got to say
    assert main(["--data", str(data), "--storage", str(tmp_path / "exp"), "--skip-corrupt", "--positive-class", "x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    warning = [line for line in lines if "unreadable" in line]
    assert warning == [line for line in warning if line.startswith("warning: left out 1 unreadable image(s)")]
    assert len(warning) == 1 and "scan 7.png" in warning[0] and not any("UserWarning" in line for line in lines)


def test_the_stop_rule_ends_a_search_whose_proposals_add_nothing_validation_resolves(tmp_path, pneumonia_npz, capsys):
    """2-fold cross-validated tiny search, patience 2: once the best is within its cross-validation
    error of AUC 1, or the three first trials have ended and two proposed trials in a row have not
    beaten the best by more than that error, no more trials start and the running ones stop; the
    console, timings.json and the report say so, with the budget unspent."""
    from search.final.pipeline import _stop_rule
    from search.final.report import _stop_rule as report_line
    from search.engine.tuner import load_study
    folder = _run(tmp_path, space="tiny", data=str(pneumonia_npz), num_samples=16, subset=300, folds=2,
                  max_epochs=2, stop_rule=True, stop_patience=2, time_budget=600, name="stop")
    out = capsys.readouterr().out
    board = pd.read_csv(folder / "leaderboard.csv")
    stop = json.loads((folder / "timings.json").read_text())["stop_rule"]
    assert "stop rule: the best within its validation error of the metric's ceiling, or 2 proposed trials" in out
    assert stop["on"] and stop["stopped"] and stop["patience"] == 2 and stop["bound"] in ("ceiling", "stagnation"), stop
    assert stop["trials_run"] == len(board) < 16 and stop["trials_unspent"] == 16 - len(board)
    fit = json.loads((folder / "timings.json").read_text())["fit_seconds"]
    assert stop["budget_unspent_seconds"] == pytest.approx(600 - fit, abs=1)
    said = {"stagnation": "stop rule: the last 2 trials the sampler proposed did not beat the last resolved improvement",
            "ceiling": f"stop rule: the best trial ({stop['best_trial']}, val_auc {stop['best']:.4f}) is within its "
                       f"validation error"}[stop["bound"]]
    assert out.count(said) == 1 and "the running ones stop where they are" in out
    assert f"stop rule: the search ended after {len(board)} of 16 trials" in out
    # the rule's best is a trial of the leaderboard, with its error from its folds' spread at its best epoch
    best = board.set_index("trial_id").loc[stop["best_trial"]]
    assert best["val_auc"] == pytest.approx(stop["best"])
    epochs = [json.loads(line) for line in (folder / f"trial_{stop['best_trial']}" / "result.json").read_text().splitlines()]
    at_best = max(epochs, key=lambda e: e["val_auc"])
    assert stop["error"] == pytest.approx(at_best["val_auc_std"] * (1 / 2 + 1) ** 0.5) and stop["error"] > 0
    ended = board[board["status"] == "TERMINATED"]
    assert ended["val_auc"].max() == pytest.approx(stop["best"])  # the rule's best is the best trial that ended
    if stop["bound"] == "ceiling":
        assert 1 - stop["best"] <= stop["error"]
    else:
        study = load_study(folder).trials
        assert sum("fixed_params" not in t.system_attrs for t in study) >= 2  # the rule waited for two proposals
    assert _stop_rule(folder) == stop
    assert f"The stop rule ended it after {len(board)} trials ({16 - len(board)} of its trials and" in report_line(stop)


def test_stop_rule_errors_and_decisions():
    from search.engine.stop_rule import StopRule, hanley_mcneil, validation_error
    assert hanley_mcneil(0.9, 50, 50) == pytest.approx(0.0321, abs=5e-4)  # Hanley & McNeil 1982, table 2
    assert validation_error({"val_auc": 0.99, "val_auc_std": 0.003, "folds": 5}, "val_auc", None) == \
        pytest.approx(0.003 * (1 / 5 + 1 / 4) ** 0.5)
    one_split = validation_error({"val_auc": 0.95}, "val_auc", [100, 300])
    assert one_split == pytest.approx((hanley_mcneil(0.95, 100, 300) + hanley_mcneil(0.95, 300, 100)) / 2)
    assert validation_error({"val_acc": 0.9}, "val_acc", [50, 50]) == pytest.approx(0.03)
    assert validation_error({"val_loss": 0.3}, "val_loss", [50, 50]) is None  # no closed form: no stop
    rule = StopRule(patience=2, mode="min", first=2)
    assert not rule.update("a", 0.50, 0.02, proposed=False)
    assert not rule.update("p1", 0.49, 0.02, proposed=True)  # within the error: one in a row
    assert not rule.update("p2", 0.495, 0.02, proposed=True)  # two, but a first trial is still running
    assert not rule.update("b", 0.45, 0.01, proposed=False)  # a first trial resolves better: counting restarts
    assert rule.best_trial == "b" and rule.since == 0
    assert not rule.update("p3", 0.445, 0.01, proposed=True) and not rule.update("p4", None, None, proposed=True)
    assert rule.best_trial == "p3"  # the best seen, though not by a resolved margin
    assert rule.update("p5", 0.46, 0.01, proposed=True) and rule.since == 2 and rule.stopped == "stagnation"
    ceiling = StopRule(patience=9, mode="max", first=3, ceiling=1.0)
    assert not ceiling.update("x", 0.95, 0.01, proposed=False)  # 0.05 left to gain: more than resolved
    assert ceiling.update("y", 0.992, 0.01, proposed=False) and ceiling.stopped == "ceiling"  # 0.008 left, +-0.01
    assert not StopRule(patience=9, mode="min").update("z", 0.001, 0.01, proposed=False)  # a loss has no ceiling


def test_the_stop_rule_goes_on_through_a_run_of_small_gains_that_add_up_to_more_than_the_error():
    from search.engine.stop_rule import StopRule
    rule = StopRule(patience=4, mode="max")  # the case: +0.02 four times, error 0.03, patience 4
    assert not rule.update("first", 0.80, 0.03, proposed=False)
    for k, value in enumerate((0.81, 0.82, 0.83), start=1):  # within the error of 0.80, and of each other
        assert not rule.update(f"p{k}", value, 0.03, proposed=True)
    assert rule.since == 3 and rule.baseline_trial == "first" and rule.best_trial == "p3"
    assert not rule.update("p4", 0.84, 0.03, proposed=True)  # 0.84 - 0.80 > 0.03: resolved, though 0.01 above p3
    assert rule.since == 0 and rule.baseline_trial == "p4"
    for k in range(5, 8):
        assert not rule.update(f"p{k}", 0.86, 0.03, proposed=True)
    assert rule.update("p8", 0.87, 0.03, proposed=True) and rule.stopped == "stagnation"  # 0.87 is not above 0.84 + 0.03
    assert "last resolved improvement (trial p4, val_auc 0.8400)" in rule.reason("val_auc") and rule.best_trial == "p8"


def test_stagnation_waits_for_a_running_trial_that_already_beats_the_baseline_by_more_than_the_error():
    from search.engine.stop_rule import StopRule
    # sarscov2-ct seed 2 (bf6d38f): the 4th proposal in a row ended below 0.9804 +- 0.0089 while a running
    # DenseNet121 had reported 0.9919 at epoch 2; the rule stopped it, and the full run's DenseNet121 reached 0.998
    rule = StopRule(patience=4, mode="max")
    assert not rule.update("first", 0.9804, 0.0089, proposed=False)
    for k in range(1, 4):
        assert not rule.update(f"p{k}", 0.96, 0.01, proposed=True, running=(0.9919,))
    assert not rule.update("p4", 0.8685, 0.02, proposed=True, running=(0.9919, 0.85))  # 0.9919 > 0.9804 + 0.0089
    assert rule.since == 4 and not rule.stopped
    assert not rule.update("densenet", 0.9935, 0.0060, proposed=True)  # it ends: a resolved improvement
    assert rule.since == 0 and rule.baseline_trial == "densenet"
    late = StopRule(patience=1, mode="max")
    late.update("first", 0.9804, 0.0089, proposed=False)
    assert late.update("p1", 0.97, 0.01, proposed=True, running=(0.9890,))  # within the error: it stops
    for running, stops in (((0.25,), False), ((0.295,), True), ((), True)):  # a loss: lower is better
        loss = StopRule(patience=1, mode="min")
        loss.update("first", 0.30, 0.01, proposed=False)
        assert loss.update("p1", 0.31, 0.01, proposed=True, running=running) is stops


def test_the_free_space_of_the_storage_is_compared_with_what_the_checkpoints_take(tmp_path):
    import shutil
    from search.engine.checkpoints import check_free_space, checkpoint_sizes, low_space
    from core.errors import UserError
    from trainables.models import num_params
    free = shutil.disk_usage(tmp_path).free
    one = 12 * num_params("resnet18") * 5  # 5 folds of weights and Adam's two moments, float32
    assert checkpoint_sizes(["resnet18", "small_cnn"], 5) == (one, (one + 12 * num_params("small_cnn") * 5) / 2)
    sizes = checkpoint_sizes(["resnet18"], 5)
    line = check_free_space(tmp_path / "new" / "storage", sizes=sizes, num_samples=2, slots=2)
    assert line.startswith("storage: ") and f"2 trials x {one / 1e6:,.1f} MB" in line
    many = int(free / one) + 1  # the checkpoints of this many trials do not fit
    line = check_free_space(tmp_path, sizes=sizes, num_samples=many, slots=2)
    assert line.startswith("warning: storage: ") and "the disk may fill up" in line
    with pytest.raises(UserError, match="checkpoints alone take up to .*choose another --storage"):
        check_free_space(tmp_path, sizes=sizes, num_samples=many, slots=many)
    assert low_space(tmp_path, free / 2)() is None and "less than the" in low_space(tmp_path, 2 * free)()


def test_idle_cores_are_shared_evenly_per_node():
    from search.engine.cores import shares
    assert shares({"a": "n1"}, {"n1": 2}, 1) == {"a": 2}
    assert shares({"a": "n1", "b": "n1"}, {"n1": 2}, 1) == {"a": 1, "b": 1}
    assert shares({"a": "n1", "b": "n1"}, {"n1": 5}, 1) == {"a": 3, "b": 2}
    assert shares({"a": "n1", "b": "n2"}, {"n1": 4, "n2": 2}, 2) == {"a": 4, "b": 2}


def _two_fast_then_slow(trial, *, backbones, stages, pretrained):
    """small_cnn twice, then resnet10t, which runs alone once the fast two end (module level: Ray pickles it)."""
    trial.suggest_categorical("backbone", ["small_cnn", "resnet10t"])
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    return {"weights": "random"}


@pytest.mark.parametrize("share", [True, False])
def test_the_last_trial_takes_the_idle_core(tmp_path, pneumonia_npz, monkeypatch, share):
    """Two fast trials, then a slow one on two cores: once the slow one runs alone it trains on both
    (from its next epoch on), and timings.json counts those epochs; with --no-share-idle-cores it
    stays on one."""
    from spaces import _registry
    monkeypatch.setattr(_registry, "_SPACES", dict(_registry._SPACES))
    points = ({"backbone": "small_cnn", "lr": 1e-3}, {"backbone": "small_cnn", "lr": 3e-3},
              {"backbone": "resnet10t", "lr": 1e-3})
    _registry.register_space("tail", backbones=("small_cnn", "resnet10t"), points=points, fixed=True)(_two_fast_then_slow)
    folder = _run(tmp_path, space="tail", data=str(pneumonia_npz), max_epochs=4, subset=300, scheduler="fifo",
                  name="cores", share_idle_cores=share)
    epochs = {d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
              for d in folder.glob("trial_*")}
    threads = [e["threads"] for rows in epochs.values() for e in rows]
    slot_use = json.loads((folder / "timings.json").read_text())["slot_use"]
    assert slot_use["trial_epochs"] == len(threads) == 12
    assert slot_use["epochs_on_shared_cores"] == sum(t > 1 for t in threads)
    slow = next(rows for rows in epochs.values() if rows[0]["params_m"] > 1)  # resnet10t
    if share:
        assert slow[-1]["threads"] == 2 and max(threads) == 2
    else:
        assert set(threads) == {1}
