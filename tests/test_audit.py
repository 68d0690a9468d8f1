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
from trainables.ingest.dataset import load_dataset
from trainables.ingest.leakage import audit_dataset, dedupe


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
