"""The data audit: planted leaks and shortcuts are found, clean data raises no alarm, the real
data sets' known problems are named, and the search drops (and names) the leaking copies."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, shared
from ingest.dataset import load_dataset
from ingest.leakage import audit_dataset, dedupe


@pytest.fixture
def leaky(tmp_path, png_folder):
    """train/ and test/ folders of real X-ray PNGs, with 3 train files copied into test."""
    root = tmp_path / "leaky"
    for split, lo, hi in (("train", 0, 80), ("test", 80, 120)):
        for cls in ("normal lung", "viral pneumonia"):
            (root / split / cls).mkdir(parents=True)
            for k in range(lo, hi):
                shutil.copy(png_folder / cls / f"x ray {k}.png", root / split / cls / f"x ray {k}.png")
    for k in (3, 4, 5):
        shutil.copy(root / "train" / "normal lung" / f"x ray {k}.png", root / "test" / "normal lung" / f"copy {k}.png")
    return root


def test_audit_names_planted_cross_split_duplicates_and_dedupe_drops_the_train_copies(leaky):
    data = load_dataset(leaky, image_size=28, seed=0)
    report = audit_dataset(data)
    across = [g for g in report["duplicates"]["groups"] if g["kind"] == "across_splits"]
    assert len(across) == 3
    leak = next(w for w in report["warnings"] if w.startswith("LEAK"))
    for k in (3, 4, 5):
        assert f"test/normal lung/copy {k}.png" in leak and f"train/normal lung/x ray {k}.png" in leak
    deduped, dropped = dedupe(data, report)
    # the train-folder copies go (into train or the val carved from it), the test copies stay
    assert sorted(d.split(" [")[0] for d in dropped) == [f"train/normal lung/x ray {k}.png" for k in (3, 4, 5)]
    before, after = data.counts(), deduped.counts()
    assert sum(before["train"].values()) + sum(before["val"].values()) - 3 == \
        sum(after["train"].values()) + sum(after["val"].values())
    assert after["test"] == before["test"]  # the test copies stay
    assert not [g for g in audit_dataset(deduped)["duplicates"]["groups"] if g["kind"] == "across_splits"]


def test_audit_flags_a_planted_mode_shortcut(tmp_path, pneumonia_npz):
    arrays = np.load(pneumonia_npz)
    root = tmp_path / "modes"
    for label, (cls, mode) in enumerate((("covid", "RGBA"), ("normal", "L"))):
        (root / cls).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(arrays["train_labels"].ravel() == label)[:60]):
            Image.fromarray(arrays["train_images"][i]).convert(mode).save(root / cls / f"{k}.png")
    data = load_dataset(root, image_size=28, seed=0)
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (28, 28, 1)  # one kind whatever the mode
    report = audit_dataset(data)
    mode = report["properties"]["mode"]
    assert mode["shortcut"] and mode["predictive_accuracy"] == 1.0
    assert {p["value"]: p["class"] for p in mode["pure_values"]} == {"RGBA": "covid", "L": "normal"}
    assert any(w.startswith("SHORTCUT: the file mode") for w in report["warnings"])


def _jpegs(root, pneumonia_npz, qualities):
    """Real PneumoniaMNIST X-rays at 64 px as JPEGs, each class at its own quality (compression setting)."""
    arrays = np.load(pneumonia_npz)
    for label, (cls, quality) in enumerate(zip(("normal", "pneumonia"), qualities)):
        (root / cls).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(arrays["train_labels"].ravel() == label)[:100]):
            Image.fromarray(arrays["train_images"][i]).resize((64, 64), Image.BICUBIC).save(root / cls / f"{k}.jpg",
                                                                                            quality=quality)
    return root


def test_the_shortcut_probe_warns_where_the_files_encoding_gives_the_label_away_and_not_where_saved_alike(
        tmp_path, pneumonia_npz, capsys):
    from search.data.search_data import audited
    from ingest.leakage import render
    leaky = audit_dataset(load_dataset(_jpegs(tmp_path / "leaky", pneumonia_npz, (95, 60)), image_size=32, seed=0))
    probe = leaky["probe"]["acquisition"]
    assert probe["shortcut"] and probe["auc"] >= 0.95 and probe["strongest"][0]["property"] == "JPEG quantization"
    warning = next(w for w in leaky["warnings"] if w.startswith("SHORTCUT: properties of the files"))
    assert f"AUC {probe['auc']:.2f}" in warning and "JPEG quantization" in warning
    # the same images saved alike: no warning, though their own statistics still tell the classes apart, as
    # the disease makes them (and their bytes, which compressed texture costs)
    alike = audit_dataset(load_dataset(_jpegs(tmp_path / "alike", pneumonia_npz, (90, 90)), image_size=32, seed=0))
    assert not alike["probe"]["acquisition"]["shortcut"] and alike["probe"]["acquisition"]["auc"] < 0.7
    assert not any(w.startswith("SHORTCUT") for w in alike["warnings"])
    image = alike["probe"]["image"]
    assert image["auc"] >= 0.7 and not image["shortcut"] and "bytes per pixel" in image["features"]
    assert "disease or acquisition" in render(alike) and "no shortcut found" in render(alike)
    packaged = audit_dataset(load_dataset(pneumonia_npz, image_size=28, seed=0))  # arrays: one pipeline made them
    assert packaged["probe"]["acquisition"]["auc"] is None and not any(w.startswith("SHORTCUT") for w in packaged["warnings"])
    assert 0.7 <= packaged["probe"]["image"]["auc"] <= 0.9  # opacity: pneumonia looks brighter, as it should
    capsys.readouterr()
    audited(load_dataset(tmp_path / "leaky", image_size=32, seed=0), dedupe=True)  # the console says it loudly
    out = capsys.readouterr().out
    assert "warning: SHORTCUT: properties of the files that cannot be the disease" in out and "shortcut probe:" in out


def test_clean_data_raises_no_alarm(png_folder):
    report = audit_dataset(load_dataset(png_folder, image_size=28, seed=0))
    assert report["warnings"] == [], report["warnings"]
    assert report["duplicates"]["across_splits"] == report["duplicates"]["within_split"] == 0


def test_real_3class_xrays_audit_names_the_6_files_shared_by_train_and_test():
    data = load_dataset(shared("covid19-xray-3class"), image_size=32, seed=0)
    report = audit_dataset(data)
    shared_with_test = [g for g in report["duplicates"]["groups"]
                        if any(f.startswith("test/") for f in g["files"]) and any(f.startswith("train/") for f in g["files"])]
    assert len(shared_with_test) == 6
    leak = next(w for w in report["warnings"] if w.startswith("LEAK"))
    assert all(f in leak for g in shared_with_test for f in g["files"])
    assert set(data.class_names) == {"Covid", "Normal", "Viral Pneumonia"}


def test_real_ucsd_ct_audit_finds_the_rgba_shortcut_and_keeps_patients_apart():
    data = load_dataset(shared("covid-ct-ucsd", "patients.csv"), image_size=32, seed=0)
    report = audit_dataset(data)
    pure = report["properties"]["mode"]["pure_values"]
    assert [(p["value"], p["class"], p["images"], p["of"]) for p in pure] == [("RGBA", "COVID", 174, 174)]
    splits_of = {}
    for g, s in zip(data.groups, data.split):
        splits_of.setdefault(g, set()).add(int(s))
    assert all(len(s) == 1 for s in splits_of.values())
    assert report["groups_per_split"]["test"] > 20


def test_audit_cli_writes_the_reports(tmp_path, leaky):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "search.audit", "--data", str(leaky), "--out", str(tmp_path / "a")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LEAK: 3 file(s)" in result.stdout
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert report["duplicates"]["across_splits"] == 3
    assert "copy 3.png" in (tmp_path / "a" / "data_report.md").read_text()
    missing = subprocess.run([sys.executable, "-m", "search.audit", "--data", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: data path")
