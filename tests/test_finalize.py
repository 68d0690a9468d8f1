"""Search -> finalize -> predict on real X-rays (PNG files), on the CPU with a tiny budget."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve

from conftest import one_error, run_cli, run_in_process
from core.errors import UserError
from search.run import run_search
from search.final.pipeline import finalize
from search.options import FinalizeOptions, SearchOptions
from search.final.retrain import outcome, retrain


def test_mlflow_keeps_the_leaderboard_report_and_final_model_on_the_parent_run(experiment):
    from mlflow.tracking import MlflowClient

    from search.final.saved_model import load_model
    from search.engine.tracking import tracking_uri
    folder, _ = experiment
    client = MlflowClient(tracking_uri(folder, "experiment"))
    runs = client.search_runs([client.get_experiment_by_name(folder.name).experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("role") == "search"]
    assert len(runs) == 5 and parent.info.status == "FINISHED" and parent.data.params["space"] == "tiny"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    logged |= {a.path for a in client.list_artifacts(parent.info.run_id, "final")}
    assert {"search/leaderboard.csv", "final/report.md", "final/metrics.json", "final/model"} <= logged, logged
    model = Path(parent.info.artifact_uri.removeprefix("file://")) / "final" / "model"
    assert model.is_relative_to(folder / "mlflow-artifacts")
    assert load_model(model).class_names == ["normal lung", "viral pneumonia"]  # the final model, whole


def test_finalize_writes_every_output(experiment):
    folder, metrics = experiment
    final = folder / "final"
    for name in ("metrics.json", "test_predictions.csv", "val_predictions.csv", "report.md", "ensemble/model.json"):
        assert (final / name).is_file(), name
    for plot in ("roc.png", "confusion_matrix.png", "training_curves.png", "search_progress.png", "calibration.png",
                 "saliency_normal_lung.png", "saliency_viral_pneumonia.png"):
        assert (final / plot).stat().st_size > 5000, plot
    members = [n for n, m in metrics["models"].items() if m["kind"] == "member"]
    assert len(members) == 2 and {"ensemble-mean", "ensemble-fitted"} <= set(metrics["models"])
    assert all(len(metrics["models"][n]["seeds"]) == 2 for n in members)
    configs = [json.dumps(metrics["models"][n]["config"], sort_keys=True) for n in members]
    assert len(set(configs)) == 2  # distinct configurations
    assert sorted(p.name for p in (final / "members").iterdir()) == sorted(members)
    report = (final / "report.md").read_text()
    assert metrics["chosen"] in report and all(n in report for n in members) and "Youden" in report
    saliency = report[report.index("## What the model looks at"):]  # the shortcut probe beside the saliency maps
    assert "The data audit's shortcut probe" in saliency and "disease or acquisition" in saliency
    # train/ + validation/ and no test/: the test split was carved from train, and the report says so
    assert "test carved from train by seed 0" in metrics["data"]["split_kind"] and metrics["data"]["split_kind"] in report
    test = pd.read_csv(final / "test_predictions.csv")
    assert len(test) > 0 and test["path"].str.startswith("train/").all()
    assert metrics["data"]["fingerprint"] and {"torch", "timm"} <= set(metrics["versions"])


def test_after_finalize_only_the_members_trials_keep_their_checkpoints(experiment):
    folder, metrics = experiment
    members = {m["trial_id"] for m in metrics["models"].values() if m["kind"] == "member"}
    board = pd.read_csv(folder / "leaderboard.csv")
    with_checkpoints = {t.name[len("trial_"):] for t in folder.glob("trial_*") if list(t.glob("checkpoint_*"))}
    assert len(board) == 4 and with_checkpoints == members
    assert len(list((folder / "final" / "members").rglob("*.safetensors"))) == 2 * 2  # 2 members x 2 seeds
    assert len(list((folder / "final" / "ensemble").glob("*.safetensors"))) >= 2


def test_metrics_agree_with_sklearn_on_the_predictions_file(experiment):
    folder, metrics = experiment
    table = pd.read_csv(folder / "final" / "test_predictions.csv")
    chosen = metrics["models"][metrics["chosen"]]["test"]
    names = list(chosen["per_class"])
    assert len(table) == chosen["images"] == sum(metrics["data"]["counts"]["test"].values())
    y = table["label"].map(names.index).to_numpy()
    pred = table["predicted"].map(names.index).to_numpy()
    probs = table[[f"p_{n}" for n in names]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert chosen["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert chosen["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert chosen["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, zero_division=0)
    for c, name in enumerate(names):
        row = chosen["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[c], recall[c], f1[c]))
    pos = names.index(chosen["positive_class"])
    assert chosen["sensitivity"] == pytest.approx(recall[pos])
    assert chosen["specificity"] == pytest.approx(recall[1 - pos])
    assert ((probs[:, pos] >= chosen["threshold"]) == (pred == pos)).all()
    lo, hi = chosen["ci"]["auc"]
    assert lo <= chosen["auc"] <= hi


def test_the_choice_states_its_validation_margin_over_the_runner_up(experiment):
    folder, metrics = experiment
    margin, models = metrics["choice_margin"], metrics["models"]
    chosen, runner_up = models[metrics["chosen"]], models[margin["versus"]]
    assert {chosen["kind"], runner_up["kind"]} == {"member", "ensemble"}  # ensemble vs best single model
    assert margin["difference"] == pytest.approx(chosen["val"]["auc"] - runner_up["val"]["auc"])
    lo, hi = margin["ci"]
    assert -1 <= lo <= hi <= 1
    report = (folder / "final" / "report.md").read_text()
    why = next(line for line in report.splitlines() if line.startswith("Why this model"))
    assert f"{margin['difference']:+.4f}" in why and margin["versus"] in why
    assert ("cannot tell" in why) == (lo <= 0 <= hi)


def test_threshold_is_chosen_on_validation_not_test(experiment):
    from search.outputs.evaluate import youden_threshold
    folder, metrics = experiment
    chosen = metrics["models"][metrics["chosen"]]
    pos, threshold = chosen["test"]["positive_class"], chosen["test"]["threshold"]
    assert chosen["val"]["threshold"] == threshold
    val = pd.read_csv(folder / "final" / "val_predictions.csv")
    is_pos, score = (val["label"] == pos).to_numpy(), val[f"p_{pos}"].to_numpy()
    said = score >= threshold
    fpr, tpr, _ = roc_curve(is_pos, score)
    assert said[is_pos].mean() - said[~is_pos].mean() == pytest.approx((tpr - fpr).max())  # Youden-optimal on val
    assert threshold == pytest.approx(youden_threshold(is_pos, score))
    test = pd.read_csv(folder / "final" / "test_predictions.csv")
    test_choice = youden_threshold((test["label"] == pos).to_numpy(), test[f"p_{pos}"].to_numpy())
    assert threshold != pytest.approx(test_choice)  # tiny splits: the test's own optimum lies elsewhere


def test_predict_on_png_files_agrees_with_finalize(experiment, keras_folder, tmp_path):
    folder, metrics = experiment
    table = pd.read_csv(folder / "final" / "test_predictions.csv")
    images = tmp_path / "new"
    for rel in table["path"]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(keras_folder / rel, images / rel)
    out = tmp_path / "preds.csv"
    result = run_cli("search.predict", "--model", str(folder / "final" / "ensemble"), "--images", str(images),
                  "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ray" not in result.stderr.lower()
    preds = pd.read_csv(out).set_index("path").loc[table["path"]]
    names = list(metrics["models"][metrics["chosen"]]["test"]["per_class"])
    for name in names:
        assert np.allclose(preds[f"p_{name}"].to_numpy(), table[f"p_{name}"].to_numpy(), atol=1e-5)
    assert (preds["predicted"].to_numpy() == table["predicted"].to_numpy()).all()


def test_model_directory_records_what_it_needs_and_holds_no_pickles(experiment):
    folder, metrics = experiment
    model = folder / "final" / "ensemble"
    record = json.loads((model / "model.json").read_text())
    assert record["class_names"] == ["normal lung", "viral pneumonia"]
    assert record["threshold"] == metrics["models"][metrics["chosen"]]["val"]["threshold"]
    assert record["preprocessing"] == {"image_size": 28, "channels": 1, "ct_window": "lung",
                                       "decode": "ingest.image_file.decode_image"}
    assert record["data"]["fingerprint"] == metrics["data"]["fingerprint"] and "torch" in record["versions"]
    assert all(m["config"]["backbone"] for m in record["members"])
    assert {p.suffix for p in model.iterdir()} == {".json", ".safetensors"}


def test_a_member_its_trial_already_trained_is_kept_not_retrained(experiment):
    """Every trial ran to max_epochs: each member's first seed is its trial's checkpoint, weight for
    weight, and scores validation as the trial did; the second seed is a new training."""
    from safetensors.torch import load_file
    folder, metrics = experiment
    members = {n: m for n, m in metrics["models"].items() if m["kind"] == "member"}
    assert all(m["from_trial_epoch"] == m["epochs"] == 3 for m in members.values())
    for name, m in members.items():
        (checkpoint,) = (folder / f"trial_{m['trial_id']}").glob("checkpoint_*/checkpoint.pt")
        trial_state = torch.load(checkpoint, map_location="cpu", weights_only=True)["folds"][0]["model"]
        record = json.loads((folder / "final" / "members" / name / "model.json").read_text())
        first, second = (load_file(folder / "final" / "members" / name / f) for f in record["members"][0]["files"])
        assert all(torch.equal(first[k], trial_state[k].float() if trial_state[k].is_floating_point() else trial_state[k])
                   for k in trial_state)
        assert not all(torch.equal(first[k], second[k]) for k in first)
        assert "its trial's network (epoch 3)" in (folder / "final" / "report.md").read_text()


def test_retraining_goes_on_from_a_trials_state(png_folder):
    """From a state at the member's epochs: the network is only scored; from an earlier one: the
    missing epochs are trained, continuing the schedule."""
    from ingest.dataset import load_dataset
    from trainables.train import Training
    data = load_dataset(png_folder, image_size=28, seed=0)
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 28, "max_epochs": 3, "batch_size": 32}
    run = Training(config, data)
    list(run.epochs(until=2))
    at_two = {k: v.clone() if torch.is_tensor(v) else v for k, v in run.state_dict()["model"].items()}
    scored = retrain(config, data, epochs=2, start=run.state_dict())
    assert scored["history"] == [] and scored["from_trial_epoch"] == 2
    assert outcome(scored) == "kept as its trial left it (epoch 2)"  # not "val_auc nan" in the progress line
    assert np.allclose(scored["val"], run.predict(run.val_x)) and all(torch.equal(scored["states"][0][k], at_two[k]) for k in at_two)
    on = retrain(config, data, epochs=3, start=run.state_dict())
    assert [h["epoch"] for h in on["history"]] == [3] and on["history"][0]["lr"] < config.get("lr", 1e-3)
    assert outcome(on) == f"val_auc {on['history'][-1]['val_auc']:.4f}"
    assert not np.allclose(on["val"], scored["val"])


def test_a_warm_restart_goes_on_from_the_network_with_a_fresh_cycle(png_folder):
    """After its schedule a network trains one more cycle from half the learning rate: going on from
    a trial's state gives the network retraining from scratch gives (the same run), and the cycle
    changes it."""
    from ingest.dataset import load_dataset
    from trainables.train import Training
    data = load_dataset(png_folder, image_size=28, seed=0)
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 28, "max_epochs": 2, "batch_size": 32,
              "lr": 1e-3}
    trial = Training(config, data)
    list(trial.epochs())
    restarted = retrain(config, data, epochs=2, warm_restart=2, start=trial.state_dict())
    assert [h["epoch"] for h in restarted["history"]] == [3, 4]
    assert restarted["history"][0]["lr"] == pytest.approx(0.5e-3 * 0.5)  # half the lr, half-way down its cosine
    assert restarted["history"][1]["lr"] == pytest.approx(0.0, abs=1e-9)
    from_scratch = retrain(config, data, epochs=2, warm_restart=2)
    assert len(from_scratch["history"]) == 4 and np.allclose(from_scratch["val"], restarted["val"], atol=1e-5)
    assert not np.allclose(restarted["val"], trial.predict(trial.val_x), atol=1e-3)


def test_finalize_gives_the_cores_of_finished_retrainings_to_those_still_running(pneumonia_npz):
    """Two 1-CPU retraining tasks on 2 CPUs: once the short one ends, the long one trains on both."""
    import ray
    from search.final.retrain import retrain_all
    from ingest.dataset import load_dataset
    data = load_dataset(pneumonia_npz, image_size=28, seed=0, subset=300)
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 28, "max_epochs": 2, "batch_size": 32}
    members = [{"name": "short", "config": config, "epochs": 1, "warm_restart_epochs": 0},
               {"name": "long", "config": config, "epochs": 2, "warm_restart_epochs": 10}]
    assert ray.cluster_resources()["CPU"] == 2  # the tests' shared Ray (conftest)
    (short, _), (long, _) = retrain_all(members, data, seeds=1, folds=None, refit_on_val=False, cpus=1, gpus=0)
    (alone, _), = retrain_all(members[1:], data, seeds=1, folds=None, refit_on_val=False, cpus=1, gpus=0,
                              share_idle_cores=False)
    threads = [h["threads"] for h in long[0]["history"]]
    assert len(threads) == 12 and threads[0] == 1 and threads[-1] == 2, threads
    assert {h["threads"] for h in alone[0]["history"]} == {1}  # --no-share-idle-cores: the CPUs it asked for


def test_refit_on_val_keeps_validation_predictions_from_the_train_only_model(png_folder):
    from ingest.dataset import load_dataset
    data = load_dataset(png_folder, image_size=28, seed=0)
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 28, "max_epochs": 2, "batch_size": 32}
    plain = retrain(config, data, epochs=2, refit_on_val=False)
    refit = retrain(config, data, epochs=2, refit_on_val=True)
    assert np.allclose(plain["val"], refit["val"])  # the same train-only model (same seed) scored validation
    assert not np.allclose(plain["test"], refit["test"])  # the saved model saw validation too


def test_finalize_errors(experiment, tmp_path, capsys):
    folder, _ = experiment
    one_error(run_cli("search.finalize", "--experiment", str(tmp_path / "nope")), "does not exist")
    one_error(run_in_process("search.finalize", capsys, "--experiment", str(tmp_path)), "is not an experiment folder")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(folder / "search_config.json", unfinished)
    (unfinished / "leaderboard.csv").write_text("rank,trial_id,status,val_auc\n1,abc,RUNNING,\n")
    one_error(run_in_process("search.finalize", capsys, "--experiment", str(unfinished)),
               "no trial of unfinished has reported val_auc")
    one_error(run_in_process("search.finalize", capsys, "--experiment", str(folder), "--seeds", "0"),
               "--seeds must be at least 1")
    with pytest.raises(UserError, match="unknown warm restart 'top'; choose one of best, all, none"):
        finalize(FinalizeOptions(experiment=str(folder), warm_restart="top"))
    with pytest.raises(UserError, match="--positive-class 'covid' is not a class of this data"):
        finalize(FinalizeOptions(experiment=str(folder), positive_class="covid"))


def test_predict_errors(experiment, tmp_path, capsys):
    folder, _ = experiment
    model = str(folder / "final" / "ensemble")
    out = str(tmp_path / "p.csv")
    one_error(run_cli("search.predict", "--model", str(tmp_path), "--images", str(tmp_path), "--out", out),
               "is not a model directory (no model.json)")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(run_in_process("search.predict", capsys, "--model", model, "--images", str(empty), "--out", out), "no images")
    (empty / "scan.png").write_bytes(b"not an image at all")
    one_error(run_in_process("search.predict", capsys, "--model", model, "--images", str(empty), "--out", out),
               "1 image(s) could not be read")
    one_error(run_in_process("search.predict", capsys, "--model", model, "--images", str(tmp_path / "missing"),
                           "--out", out), "does not exist")
    assert not (tmp_path / "p.csv").exists()
    cut = tmp_path / "cut"
    shutil.copytree(model, cut)
    record = json.loads((cut / "model.json").read_text())
    del record["preprocessing"]
    (cut / "model.json").write_text(json.dumps(record))
    one_error(run_in_process("search.predict", capsys, "--model", str(cut), "--images", str(empty), "--out", out),
               "model.json is incomplete (KeyError: 'preprocessing')")


def test_predict_with_skip_corrupt_predicts_the_readable_images_and_names_the_others(experiment, keras_folder,
                                                                                     tmp_path):
    folder, _ = experiment
    images = tmp_path / "new"
    shutil.copytree(keras_folder / "validation", images)
    (images / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "p.csv"
    result = run_cli("search.predict", "--model", str(folder / "final" / "ensemble"), "--images", str(images),
                  "--out", str(out), "--skip-corrupt")
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out, keep_default_na=False)
    readable = sum(1 for p in images.rglob("*.png")) - 1
    assert len(table) == readable + 1 and (table["predicted"] != "").sum() == readable
    broken = table.set_index("path").loc["broken.png"]
    assert broken["predicted"] == "" and "broken.png" in broken["error"]
    assert "1 unreadable image(s) have no prediction" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def cv_experiment(tmp_path_factory):
    """The real 3-class X-rays (251 train images): --folds auto cross-validates (5 folds); the test
    copies of files also in train are dropped from train by default."""
    from conftest import shared
    folder = run_search(SearchOptions(space="tiny", data=str(shared("covid19-xray-3class")), name="cv", stop_rule=False,
                                      storage=str(tmp_path_factory.mktemp("cv")), num_samples=3, max_epochs=2,
                                      grace_period=2, image_size=28, cpus_per_trial=1, top_k=2))
    return folder, json.loads((folder / "final" / "metrics.json").read_text())


def test_small_data_is_cross_validated_by_the_auto_rule(cv_experiment):
    folder, metrics = cv_experiment
    record = json.loads((folder / "search_config.json").read_text())
    assert record["options"]["folds"] == 5
    audit = json.loads((folder / "data_report.json").read_text())
    assert len(audit["deduped"]) >= 6 and all("[train]" in f or "[val]" in f for f in audit["deduped"])
    board = pd.read_csv(folder / "leaderboard.csv")
    assert (board["folds"] == 5).all() and board["val_auc_std"].notna().all() and (board["val_auc_std"] > 0).any()
    epochs = [json.loads(line) for line in next(folder.glob("trial_*/result.json")).read_text().splitlines()]
    assert all(e["folds"] == 5 for e in epochs)


def test_cross_validated_finalize_chooses_on_out_of_fold_predictions(cv_experiment):
    from search.outputs.evaluate import youden_threshold
    folder, metrics = cv_experiment
    pool = sum(metrics["data"]["counts"]["train"].values()) + sum(metrics["data"]["counts"]["val"].values())
    assert metrics["selection"]["mode"] == "cross-validation" and metrics["selection"]["images"] == pool
    val = pd.read_csv(folder / "final" / "val_predictions.csv")
    assert len(val) == pool and val["path"].is_unique and not val["path"].str.startswith("test/").any()
    chosen = metrics["models"][metrics["chosen"]]
    pos = chosen["test"]["positive_class"]
    assert chosen["val"]["threshold"] == pytest.approx(youden_threshold((val["label"] == pos).to_numpy(),
                                                                       val[f"p_{pos}"].to_numpy()))
    model = json.loads((folder / "final" / "ensemble" / "model.json").read_text())
    assert all(len(m["files"]) == 5 for m in model["members"])  # a member is its 5 fold models
    members = [m for m in metrics["models"].values() if m["kind"] == "member"]
    assert [m["warm_restart_epochs"] for m in members] == [2, 0]  # the best configuration trains its schedule again
    assert [m["from_trial_epoch"] for m in members] == [2, 2]  # the fold networks its trial left, not retrained
    report = (folder / "final" / "report.md").read_text()
    assert "out-of-fold predictions of train+val (5 folds)" in report and "Selection: cross-validation" in report
    assert "| 2 + 2 (warm restart) |" in report and "the best configuration trains its schedule once more" in report


def test_cross_validated_model_predicts_like_finalize(cv_experiment, tmp_path):
    from conftest import shared
    folder, _ = cv_experiment
    table = pd.read_csv(folder / "final" / "test_predictions.csv").head(12)
    images = tmp_path / "new"
    for rel in table["path"]:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared("covid19-xray-3class") / rel, images / rel)
    out = tmp_path / "preds.csv"
    result = run_cli("search.predict", "--model", str(folder / "final" / "ensemble"), "--images", str(images),
                  "--out", str(out), "--saliency", str(tmp_path / "maps"))
    assert result.returncode == 0, result.stderr[-2000:]
    preds = pd.read_csv(out).set_index("path").loc[table["path"]]
    for name in ("Covid", "Normal", "Viral Pneumonia"):  # the calibrated probabilities finalize wrote
        assert np.allclose(preds[f"p_{name}"].to_numpy(), table[f"p_{name}"].to_numpy(), atol=1e-5)
    overlays = sorted(str(p.relative_to(tmp_path / "maps")) for p in (tmp_path / "maps").rglob("*.png"))
    assert overlays == sorted(f"{rel}.png" for rel in table["path"])


def _ece(labels, probs, bins=10):
    """Expected calibration error, written out bin by bin (independently of search.outputs.calibration)."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    for b in range(bins):
        inside = (confidence >= b / bins) & ((confidence < (b + 1) / bins) if b < bins - 1 else (confidence <= 1))
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_calibration_figures_agree_with_the_predictions_file(cv_experiment):
    from sklearn.metrics import brier_score_loss, log_loss

    from search.outputs.calibration import apply_temperature, cross_fitted
    folder, metrics = cv_experiment
    names = ["Covid", "Normal", "Viral Pneumonia"]
    calibration = metrics["models"][metrics["chosen"]]["calibration"]
    assert {"ece", "brier", "log_loss", "temperature"} <= set(calibration)
    assert {"ece", "brier", "log_loss"} <= set(calibration["before"])
    test = pd.read_csv(folder / "final" / "test_predictions.csv")  # the final model's calibrated probabilities
    y, probs = test["label"].map(names.index).to_numpy(), test[[f"p_{n}" for n in names]].to_numpy()
    assert calibration["ece"] == pytest.approx(_ece(y, probs), abs=1e-6)
    assert calibration["brier"] == pytest.approx(brier_score_loss(y, probs, labels=[0, 1, 2]), abs=1e-6)
    assert calibration["log_loss"] == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), abs=1e-6)
    assert json.loads((folder / "final" / "ensemble" / "model.json").read_text())["temperature"] == \
        pytest.approx(calibration["temperature"])
    # the temperature was fitted on the out-of-fold predictions (no nearby one lowers their log loss)
    # and applied only if its gain there is beyond bootstrap noise
    val = pd.read_csv(folder / "final" / "val_predictions.csv")
    vy, vp = val["label"].map(names.index).to_numpy(), val[[f"p_{n}" for n in names]].to_numpy()
    raw = apply_temperature(vp, 1 / calibration["temperature"])
    fitted_t = calibration["fitted_temperature"]
    fitted = log_loss(vy, apply_temperature(raw, fitted_t), labels=[0, 1, 2])
    for nudge in (0.9, 1.1):
        assert log_loss(vy, apply_temperature(raw, fitted_t * nudge), labels=[0, 1, 2]) >= fitted - 1e-4
    gain = calibration["selection_log_loss_gain"]  # measured on images the temperature was not fitted on
    held_out = log_loss(vy, cross_fitted(vy, raw), labels=[0, 1, 2])
    assert gain["difference"] == pytest.approx(log_loss(vy, raw, labels=[0, 1, 2]) - held_out, abs=1e-4)
    low, high = calibration["temperature_range"]
    assert calibration["fitted_at_range_end"] == (not low * 1.01 < fitted_t < high / 1.01)
    applies = gain["ci"][0] > 0 and not calibration["fitted_at_range_end"]
    assert calibration["temperature"] == (fitted_t if applies else 1.0)
    for name, model in metrics["models"].items():
        assert {"ece", "brier", "log_loss"} <= set(model["calibration"]), name
    assert (folder / "final" / "calibration.png").stat().st_size > 5000


def test_three_first_trials_are_too_few_for_importances(cv_experiment):
    folder, metrics = cv_experiment
    assert metrics["importance"] == {"values": None, "trials": 0, "fixed": 3, "warm": 0, "minimum": 10}
    assert not (folder / "final" / "importance.png").exists()
    assert "What mattered: too few trials to tell. 0 trial(s) with parameters the sampler chose" in \
        (folder / "final" / "report.md").read_text()


def test_importances_are_fanova_over_the_sampled_trials_only():
    """Nine first trials at fixed values and one backbone each, whose scores differ by backbone alone,
    then sampled trials whose score follows the learning rate: the importances come from the latter."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    from search.final.importance import importances
    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def run(trial):
        backbone = trial.suggest_categorical("backbone", ["a", "b", "c"])
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_float("dropout", 0.0, 0.5)
        first = trial.number < 9  # the enqueued ones
        return ({"a": 0.6, "b": 0.7, "c": 0.8}[backbone] if first else 0.9 - 0.1 * abs(np.log10(lr) + 2.5)
                + rng.normal(0, 0.005))

    for k in range(9):
        study.enqueue_trial({"backbone": "abc"[k % 3], "lr": 1e-3, "dropout": 0.2})
    study.optimize(run, n_trials=9 + 6)
    assert importances(study) == {"values": None, "trials": 6, "fixed": 9, "warm": 0, "minimum": 10}
    study.optimize(run, n_trials=14)
    distributions = study.trials[-1].distributions
    for k in range(8):  # a warm start's trials, whose scores follow dropout alone: left out
        dropout = 0.05 * k
        study.add_trial(optuna.trial.create_trial(
            params={"backbone": "a", "lr": 1e-3, "dropout": dropout}, distributions=distributions, value=0.5 + dropout,
            user_attrs={"warm_start_from": "experiments/earlier"}))
    found = importances(study)
    assert found["trials"] == 20 and found["fixed"] == 9 and found["warm"] == 8
    assert max(found["values"], key=found["values"].get) == "lr"
    sampled = optuna.create_study(direction="maximize")
    sampled.add_trials([t for t in study.trials if "fixed_params" not in t.system_attrs
                        and "warm_start_from" not in t.user_attrs])
    assert found["values"] == pytest.approx(get_param_importances(sampled, evaluator=FanovaImportanceEvaluator(seed=0)))


def test_saliency_figures_show_each_class_most_confident_right_and_wrong(cv_experiment):
    folder, metrics = cv_experiment
    test = pd.read_csv(folder / "final" / "test_predictions.csv")
    report = (folder / "final" / "report.md").read_text()
    for name, shown in metrics["saliency"].items():
        assert (folder / "final" / shown["file"]).stat().st_size > 5000 and shown["file"] in report
        for row, pick in (("most_confident_correct", (test["label"] == name) & (test["predicted"] == name)),
                          ("most_confident_errors", (test["label"] != name) & (test["predicted"] == name))):
            expected = test[pick].sort_values(f"p_{name}", ascending=False, kind="stable")["index"].head(4).tolist()
            assert shown[row] == expected, (name, row)
    assert set(metrics["saliency"]) == {"Covid", "Normal", "Viral Pneumonia"}


def test_refit_on_val_is_refused_for_a_cross_validated_search(cv_experiment):
    folder, _ = cv_experiment
    with pytest.raises(UserError, match="--refit-on-val does not apply to this cross-validated search"):
        finalize(FinalizeOptions(experiment=str(folder), refit_on_val=True))


def test_a_failed_trial_is_never_a_member_and_a_failed_retraining_is_replaced(experiment, tmp_path):
    """The best trial is marked ERROR in the leaderboard and the next one's configuration diverges
    when retrained: neither is kept, the next two configurations fill in, the report names the failure."""
    folder, _ = experiment
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    board = pd.read_csv(copy / "leaderboard.csv")
    board.loc[0, "status"] = "ERROR"
    board.to_csv(copy / "leaderboard.csv", index=False)
    broken = copy / f"trial_{board['trial_id'][1]}" / "params.json"
    broken.write_text(json.dumps({**json.loads(broken.read_text()), "lr": 1e8, "optimizer": "sgd"}))
    older = tmp_path / "older-search" / "final"  # a sibling finalized by an older version, on the same data
    older.mkdir(parents=True)
    theirs = json.loads((folder / "final" / "metrics.json").read_text())
    (older / "metrics.json").write_text(json.dumps({"data": theirs["data"], "chosen": "x", "models": {"x": {}}}))
    checkpoints = sorted(copy.glob("trial_*/checkpoint_*"))
    with pytest.warns(UserWarning, match="left older-search out of the comparison"):
        final = finalize(FinalizeOptions(experiment=str(copy), top_k=2, bootstrap=50, keep_checkpoints="all"))
    assert sorted(copy.glob("trial_*/checkpoint_*")) == checkpoints
    assert not list(copy.glob(".final.tmp*"))
    metrics = json.loads((final / "metrics.json").read_text())
    members = [m["trial_id"] for m in metrics["models"].values() if m["kind"] == "member"]
    assert members == list(board["trial_id"][2:4])
    (failed,) = metrics["failed_members"]
    assert failed["trial_id"] == board["trial_id"][1] and "diverged" in failed["error"]
    assert "Retraining failed" in (final / "report.md").read_text() and failed["name"] in (final / "report.md").read_text()
    # --keep-checkpoints used: the failed trial keeps its checkpoint (--resume retries it from there); a
    # finished trial no member came from loses its own
    from search.final.pipeline import remove_unused_checkpoints
    remove_unused_checkpoints(copy, board, keep=set(members))
    assert list((copy / f"trial_{board['trial_id'][0]}").glob("checkpoint_*"))
    assert not list((copy / f"trial_{board['trial_id'][1]}").glob("checkpoint_*"))


def test_the_gpu_profile_runs_end_to_end_on_a_cpu(tmp_path, pneumonia_npz):
    """The gpu profile's settings (224 px, bfloat16 autocast, channels-last), its epochs and trials
    scaled down to a tiny subset and its GPU swapped for a CPU core: search, finalize, predict."""
    from search.final.saved_model import load_model
    folder = run_search(SearchOptions(space="backbones", backbones="mobilenetv3_small_100", data=str(pneumonia_npz), stop_rule=False,
                                      profile="gpu", gpus_per_trial=0, cpus_per_trial=1, max_concurrent=2,
                                      num_samples=2, max_epochs=2, grace_period=1, subset=16, folds=1,
                                      weights="random", precision="bf16", memory_format="channels_last",
                                      top_k=1, storage=str(tmp_path), name="gpu-profile"))
    record = json.loads((folder / "search_config.json").read_text())
    assert record["profile"] == "gpu" and record["options"]["image_size"] == 224
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 2 and board["val_auc"].notna().all() and (board["precision"] == "bf16").all()
    assert (board["memory_format"] == "channels_last").all()
    metrics = json.loads((folder / "final" / "metrics.json").read_text())
    assert np.isfinite(metrics["models"][metrics["chosen"]]["test"]["auc"])
    model = load_model(folder / "final" / "ensemble")
    (net, prep), = model.members[0][1]
    assert prep.autocast == (True, torch.bfloat16) and prep.channels_last and prep.input_size == 224
    test = pd.read_csv(folder / "final" / "test_predictions.csv")
    from ingest.dataset import load_dataset
    images = load_dataset(pneumonia_npz, image_size=224, subset=16).arrays("test")[0]
    assert np.allclose(model.predict_proba(images)[:, 1], test["p_pneumonia"].to_numpy(), atol=1e-4)


def test_a_final_folder_that_fails_half_way_leaves_no_temporary_folder_and_keeps_the_old_one(experiment, tmp_path,
                                                                                          monkeypatch):
    from search.final import pipeline as final_module
    folder, _ = experiment
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    before = (copy / "final" / "metrics.json").read_bytes()

    def no_space(*_, **__):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(final_module, "render_report", no_space)
    with pytest.raises(OSError, match="No space left"):
        finalize(FinalizeOptions(experiment=str(copy), top_k=1, seeds=1, bootstrap=20))
    assert not list(copy.glob(".final.tmp*")) and (copy / "final" / "metrics.json").read_bytes() == before
