"""External test sets: the final model read out on labelled data from elsewhere (finalize --external,
predict --data), its threshold unchanged; classes matched by name; refusals."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import one_error, run_cli, run_in_process
from core.errors import UserError
from search.data.external_sets import check_externals, match_classes, parse_class_map
from search.final.external import external_lines, file_stem
from search.final.pipeline import finalize
from search.options import FinalizeOptions


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory, pneumonia_npz, keras_folder):
    """PneumoniaMNIST's own test X-rays as JPEGs (40 per class), the class folders spelled otherwise than the
    model's ('Normal-Lung', 'viral_pneumonia'), plus 3 files copied from the model's own training data."""
    arrays = np.load(pneumonia_npz)
    root = tmp_path_factory.mktemp("elsewhere")
    for label, name in enumerate(["Normal-Lung", "viral_pneumonia"]):
        (root / name).mkdir()
        for k, i in enumerate(np.flatnonzero(arrays["test_labels"].ravel() == label)[:40]):
            Image.fromarray(arrays["test_images"][i]).resize((64, 64)).save(root / name / f"{k}.jpg", quality=90)
    for own in sorted((keras_folder / "train" / "normal lung").iterdir())[:3]:
        shutil.copy(own, root / "Normal-Lung" / own.name)
    return root


@pytest.fixture(scope="module")
def finalized(tmp_path_factory, experiment, elsewhere):
    """The tiny search's copy finalized again with `--external elsewhere` (one member, one seed: its trial's network)."""
    folder = tmp_path_factory.mktemp("ext") / "pipeline"
    shutil.copytree(experiment[0], folder)
    final = finalize(FinalizeOptions(experiment=str(folder), external=[str(elsewhere)], top_k=1, seeds=1,
                                     warm_restart="none", bootstrap=200))
    return final, json.loads((final / "metrics.json").read_text())


def test_an_external_set_gets_the_internal_read_out_at_the_validation_threshold(finalized, elsewhere):
    final, metrics = finalized
    chosen = metrics["models"][metrics["chosen"]]
    [ext] = metrics["external"]
    assert ext["name"] == elsewhere.name and ext["images"] == 80 and ext["left_out"] == 3
    assert ext["matched"] == {"Normal-Lung": "normal lung", "viral_pneumonia": "viral pneumonia"}
    assert ext["threshold"] == chosen["val"]["threshold"] == chosen["test"]["threshold"]
    table = pd.read_csv(final / f"external_{elsewhere.name}_predictions.csv")
    assert len(table) == 80 and not table["path"].str.startswith("Normal-Lung/x ray").any()  # the copies left out
    is_positive = (table["label"] == "viral pneumonia").to_numpy()
    assert ext["auc"] == pytest.approx(roc_auc_score(is_positive, table["p_viral pneumonia"]))
    said = (table["p_viral pneumonia"] >= ext["threshold"]).to_numpy()
    assert (table["predicted"] == "viral pneumonia").to_numpy().tolist() == said.tolist()
    assert ext["sensitivity"] == pytest.approx(said[is_positive].mean())
    assert ext["specificity"] == pytest.approx((~said[~is_positive]).mean())
    assert ext["ci"]["auc"][0] <= ext["auc"] <= ext["ci"]["auc"][1]
    assert ext["drop"]["auc"] == pytest.approx(chosen["test"]["auc"] - ext["auc"])
    assert set(ext["calibration"]) == {"ece", "brier", "log_loss"}
    report = (final / "report.md").read_text()
    assert "## External test sets" in report and f"**{elsewhere.name}**" in report and "| internal test |" in report
    assert "Normal-Lung as normal lung" in report and "3 image(s) whose file is also in the model's own data" in report
    assert (final / "external_roc.png").stat().st_size > 10_000


def test_predict_with_labels_agrees_with_finalize(finalized, elsewhere, tmp_path):
    final, metrics = finalized
    out = tmp_path / "elsewhere.csv"
    result = run_cli("search.predict", "--model", str(final / "ensemble"), "--data", str(elsewhere), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    ours = pd.read_csv(out).set_index("path")
    assert len(ours) == 83  # predict has no list of the model's files: its copies stay in
    theirs = pd.read_csv(final / f"external_{elsewhere.name}_predictions.csv").set_index("path")
    ours = ours.loc[theirs.index]
    assert np.allclose(ours["p_viral pneumonia"], theirs["p_viral pneumonia"], atol=1e-5)
    assert (ours["label"] == theirs["label"]).all() and (ours["predicted"] == theirs["predicted"]).all()
    read = json.loads(out.with_suffix(".json").read_text())
    assert read["internal_test"]["auc"] == metrics["models"][metrics["chosen"]]["test"]["auc"]
    assert read["external"]["threshold"] == metrics["models"][metrics["chosen"]]["val"]["threshold"]
    assert "| internal test |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "elsewhere_roc.png").is_file()


def test_a_set_scored_the_wrong_way_round_is_called_so_and_names_make_clean_file_names(finalized):
    _, metrics = finalized
    chosen = metrics["models"][metrics["chosen"]]
    [ext] = metrics["external"]
    flipped = {**ext, "auc": 1 - ext["auc"] if ext["auc"] > 0.5 else ext["auc"]}
    said = "\n".join(external_lines([flipped], chosen["test"]))
    assert f"**AUC {flipped['auc']:.3f} is below chance**" in said
    assert "below chance" not in "\n".join(external_lines([{**ext, "auc": 0.5}], chosen["test"]))
    assert file_stem("covid-ct-ucsd/patients.csv") == "covid-ct-ucsd-patients"
    assert file_stem("sarscov2-ct") == "sarscov2-ct" and file_stem("../x y/") == "x-y" and file_stem("///") == "set"


def test_classes_are_matched_by_name_or_refused():
    ours = ["COVID", "non-COVID"]
    assert match_classes(["covid", "NonCOVID"], ours, {}, "x") == {"covid": "COVID", "NonCOVID": "non-COVID"}
    assert match_classes(["CT_COVID", "CT_NonCOVID"], ours, {"CT_COVID": "COVID", "CT_NonCOVID": "non-COVID"}, "x") \
        == {"CT_COVID": "COVID", "CT_NonCOVID": "non-COVID"}
    with pytest.raises(UserError, match=r"class\(es\) \['pneumonia'\] match none of the model's classes"):
        match_classes(["COVID", "non-COVID", "pneumonia"], ours, {}, "x")
    with pytest.raises(UserError, match=r"has no image of the model's class\(es\) \['non-COVID'\]"):
        match_classes(["COVID"], ours, {}, "x")
    with pytest.raises(UserError, match=r"maps to \['normal'\], not classes of the model"):
        match_classes(["COVID", "NonCOVID"], ours, {"NonCOVID": "normal"}, "x")
    assert parse_class_map(["a=b", " c = d "]) == {"a": "b", "c": "d"}
    for bad, message in ((["a"], "write THEIRS=OURS"), (["=b"], "write THEIRS=OURS"), (["a=b", "a=c"], "names 'a' twice")):
        with pytest.raises(UserError, match=message):
            parse_class_map(bad)


def test_external_errors(experiment, elsewhere, tmp_path, capsys):
    folder, _ = experiment
    one_error(run_cli("search.finalize", "--experiment", str(folder), "--external", str(tmp_path / "nowhere")),
              f"--external '{tmp_path / 'nowhere'}' does not exist")
    with pytest.raises(UserError, match="--class-map applies to the sets given with --external"):
        check_externals(None, ["a=b"])
    half = tmp_path / "half"
    shutil.copytree(elsewhere / "Normal-Lung", half / "normal lung")
    (half / "other").mkdir()
    shutil.copy(next((elsewhere / "viral_pneumonia").iterdir()), half / "other" / "x.jpg")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(UserError, match=r"class\(es\) \['other'\] match none of the model's classes"):
        finalize(FinalizeOptions(experiment=str(folder), external=[str(half)]))
    with pytest.raises(UserError, match=r"--class-map names \['Other'\], no class of the external sets"):
        finalize(FinalizeOptions(experiment=str(folder), external=[str(elsewhere)], class_map=["Other=normal lung"]))
    shutil.rmtree(half / "other")
    (half / "viral pneumonia").mkdir()
    with pytest.raises(UserError, match=r"has no image of the model's class\(es\) \['viral pneumonia'\]"):
        finalize(FinalizeOptions(experiment=str(folder), external=[str(half)]))
    assert sorted(p.name for p in folder.iterdir()) == before  # refused before retraining: nothing written
    model, out = str(folder / "final" / "ensemble"), str(tmp_path / "p.csv")
    one_error(run_in_process("search.predict", capsys, "--model", model, "--images", str(elsewhere), "--out", out,
                             "--class-map", "a=b"), "--class-map applies to a labelled set given with --data")
    one_error(run_in_process("search.predict", capsys, "--model", model, "--data", str(half), "--out", out),
              "has no image of the model's class(es) ['viral pneumonia']")
    own = json.loads((folder / "search_config.json").read_text())["options"]["data"]
    one_error(run_in_process("search.predict", capsys, "--model", model, "--data", own, "--out", out),
              "is the data the model was trained and tested on")
    assert not (tmp_path / "p.csv").exists()
