"""Loading, splitting and validating real data; every bad-input case gives a clear UserError."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from conftest import shared
from core.errors import UserError
from ingest.dataset import SPLITS, load_dataset
from ingest.image_file import decode_image


def test_npz_keeps_the_medmnist_split(pneumonia_npz):
    data = load_dataset(pneumonia_npz, image_size=32)
    assert data.class_names == ["normal", "pneumonia"]
    assert data.counts() == {"train": {"normal": 1214, "pneumonia": 1214}, "val": {"normal": 135, "pneumonia": 135},
                             "test": {"normal": 234, "pneumonia": 234}}
    assert data.images.shape == (3166, 32, 32, 1) and data.images.dtype == np.uint8
    assert data.split_kind == "given"
    assert data.fingerprint == hashlib.sha256(pneumonia_npz.read_bytes()).hexdigest()[:32]


def test_folder_split_is_stratified_8_1_1_and_repeatable(png_folder):
    data = load_dataset(png_folder, image_size=32, seed=1)
    assert data.class_names == ["normal lung", "viral pneumonia"]
    counts = data.counts()
    assert counts["train"] == {"normal lung": 96, "viral pneumonia": 96}
    assert counts["val"] == counts["test"] == {"normal lung": 12, "viral pneumonia": 12}
    assert data.split_kind == "stratified"
    again = load_dataset(png_folder, image_size=32, seed=1)
    other = load_dataset(png_folder, image_size=32, seed=2)
    assert np.array_equal(data.split, again.split)
    assert not np.array_equal(data.split, other.split)


def test_fingerprint_changes_with_the_files(tmp_path, png_folder):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(png_folder, copy)
    before = load_dataset(copy, image_size=16).fingerprint
    Image.new("L", (40, 40), 128).save(copy / "normal lung" / "extra.png")
    assert load_dataset(copy, image_size=16).fingerprint != before


def test_given_train_test_folders_keep_test_and_carve_val_from_train():
    data = load_dataset(shared("covid19-xray-3class"), image_size=32)
    assert data.class_names == ["Covid", "Normal", "Viral Pneumonia"]
    counts = data.counts()
    assert counts["test"] == {"Covid": 26, "Normal": 20, "Viral Pneumonia": 20}
    assert {k: counts["train"][k] + counts["val"][k] for k in counts["train"]} == \
        {"Covid": 111, "Normal": 70, "Viral Pneumonia": 70}
    assert all(v > 0 for v in counts["val"].values())
    test_paths = {p for p, s in zip(data.paths, data.split) if s == 2}
    assert all(p.startswith("test/") for p in test_paths) and len(test_paths) == 66


def test_manifest_groups_never_cross_splits():
    data = load_dataset(shared("covid-ct-ucsd", "patients.csv"), image_size=32, seed=3)
    assert data.groups is not None and "grouped" in data.split_kind
    splits_of = {}
    for group, split in zip(data.groups, data.split):
        splits_of.setdefault(group, set()).add(int(split))
    assert all(len(s) == 1 for s in splits_of.values())
    assert all(0.05 < len(data.indices(s)) / len(data.labels) < 0.85 for s in SPLITS)


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "I;16", "P"])
def test_every_colour_mode_decodes_to_the_same_kind(tmp_path, mode):
    gray = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 256)
    else:
        image = Image.fromarray(gray).convert(mode)
    image.save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png", image_size=20, channels=1)
    assert out.shape == (20, 20, 1) and out.dtype == np.uint8
    reference = decode_image(_save(tmp_path / "ref.png", Image.fromarray(gray)), image_size=20, channels=1)
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 2


def _save(path, image):
    image.save(path)
    return path


def _folder(root, spec):
    """spec: {"class": n_images} or {"split/class": n}."""
    for name, n in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(np.full((12, 12), 10 * k % 255, np.uint8)).save(root / name / f"{k}.png")
    return root


def test_auto_image_size_follows_the_files_own_size(tmp_path, pneumonia_npz):
    assert load_dataset(pneumonia_npz, image_size="auto").images.shape[1:] == (32, 32, 1)  # 28 px
    ct = load_dataset(shared("covid19-xray-3class"), image_size="auto")  # X-rays of hundreds of px
    assert ct.images.shape[1:] == (64, 64, 1)
    for side, expected in ((40, 32), (120, 64)):
        root = tmp_path / str(side)
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            for k in range(12):
                Image.new("L", (side, side + 5), 10 * k).save(root / name / f"{k}.png")
        assert load_dataset(root, image_size="auto").images.shape[1] == expected


@pytest.mark.parametrize("size", [4, "big", 32.5])
def test_error_bad_image_size(pneumonia_npz, size):
    with pytest.raises(UserError, match=f"--image-size must be 'auto' or a whole number of pixels, 8 or more; got {size!r}"):
        load_dataset(pneumonia_npz, image_size=size)


def test_error_no_such_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_error_no_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        load_dataset(tmp_path)


def test_error_loose_images_need_class_folders(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="one sub-folder per class"):
        load_dataset(tmp_path)


def test_error_corrupt_images_are_named_and_can_be_skipped(tmp_path):
    root = _folder(tmp_path, {"a": 20, "b": 20})
    (root / "a" / "broken.png").write_bytes(b"not a png")
    (root / "b" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(UserError, match=r"2 image\(s\) could not be read: .*broken\.png.*truncated\.jpg"):
        load_dataset(root, image_size=8)
    with pytest.warns(UserWarning, match=r"left out 2 unreadable image\(s\): .*broken\.png.*truncated\.jpg"):
        data = load_dataset(root, image_size=8, skip_corrupt=True)
    assert len(data.labels) == 40


def test_error_only_one_class(tmp_path):
    with pytest.raises(UserError, match="only one class .'a'."):
        load_dataset(_folder(tmp_path, {"a": 10}))


def test_error_split_lacks_a_class(tmp_path):
    root = _folder(tmp_path, {"train/a": 10, "train/b": 10, "val/a": 3, "test/a": 3, "test/b": 3})
    with pytest.raises(UserError, match="split 'val' has no images of class.*'b'"):
        load_dataset(root, image_size=8)


def test_error_split_folders_mixed_with_class_folders(tmp_path):
    with pytest.raises(UserError, match="mixes split folders"):
        load_dataset(_folder(tmp_path, {"train/a": 3, "train/b": 3, "extra": 3}))


def test_error_manifest_unknown_columns(tmp_path):
    root = _folder(tmp_path, {"a": 2})
    (tmp_path / "m.csv").write_text("path,label,site\na/0.png,a,x\n")
    with pytest.raises(UserError, match=r"unknown column\(s\) \['site'\]; allowed: path, label"):
        load_dataset(root / "m.csv")


def test_error_manifest_missing_files(tmp_path):
    _folder(tmp_path, {"a": 2})
    (tmp_path / "m.csv").write_text("path,label\na/0.png,a\na/9.png,a\nb/1.png,b\n")
    with pytest.raises(UserError, match=r"2 listed file\(s\) do not exist: a/9.png, b/1.png"):
        load_dataset(tmp_path / "m.csv")


def test_class_names_that_differ_only_in_case_or_spaces_are_refused_in_manifests_and_folders(tmp_path):
    root = _folder(tmp_path, {"normal": 3, "pneumonia": 3})
    rows = [f"normal/{k}.png,normal" for k in range(2)] + ["normal/2.png,Normal "] + \
        [f"pneumonia/{k}.png,pneumonia" for k in range(3)]
    (root / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"label column of manifest .*m.csv spell one class several ways: "
                                         r"'Normal ' / 'normal', differing only in case or spaces"):
        load_dataset(root / "m.csv")
    (root / "Pneumonia").mkdir()  # beside pneumonia/: a second spelling of the class as a folder
    (root / "pneumonia" / "0.png").rename(root / "Pneumonia" / "0.png")
    with pytest.raises(UserError, match=r"class folders of .* spell one class several ways: 'Pneumonia' / 'pneumonia'"):
        load_dataset(root)


def test_error_manifest_without_label_column(tmp_path):
    (tmp_path / "m.csv").write_text("path\na.png\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) \['label'\]"):
        load_dataset(tmp_path / "m.csv")


def test_error_npz_without_medmnist_keys(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(UserError, match="not a MedMNIST-style .npz"):
        load_dataset(tmp_path / "d.npz")


def test_subset_caps_each_split_stratified(pneumonia_npz):
    data = load_dataset(pneumonia_npz, image_size=16, subset=100)
    assert {s: sum(c.values()) for s, c in data.counts().items()} == {"train": 100, "val": 100, "test": 100}
    assert data.counts()["train"] == {"normal": 50, "pneumonia": 50}


def _splits_of(data) -> dict:
    out = {}
    for group, split in zip(data.groups, data.split):
        out.setdefault(group, set()).add(int(split))
    return out


@pytest.mark.parametrize("source", [("covid19-xray-3class",), ("covid-ct-ucsd", "patients.csv")])
def test_cv_folds_partition_train_and_val_stratified_and_keep_test_out(source):
    data = load_dataset(shared(*source), image_size=16, seed=1)
    grouped = data.groups is not None
    folds = data.cv_folds(5, seed=7)
    pool = np.sort(np.concatenate([data.indices("train"), data.indices("val")]))
    held = np.concatenate([h for _, h in folds])
    assert len(folds) == 5 and np.array_equal(np.sort(held), pool)  # every train+val image held out once
    assert not set(held) & set(data.indices("test"))
    for train, held_out in folds:
        assert not set(train) & set(held_out) and len(train) + len(held_out) == len(pool)
        shares = np.bincount(data.labels[held_out], minlength=data.num_classes) / len(held_out)
        assert np.abs(shares - np.bincount(data.labels[pool]) / len(pool)).max() < 0.12  # stratified
    if grouped:  # no patient on both sides of a fold
        for train, held_out in folds:
            assert not set(data.groups[train]) & set(data.groups[held_out])
    again = data.cv_folds(5, seed=7)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def test_cv_folds_too_many_for_the_patients_is_a_clear_error(tmp_path):
    root = _folder(tmp_path, {"train/a": 20, "train/b": 3, "val/a": 2, "val/b": 1, "test/a": 2, "test/b": 1})
    data = load_dataset(root, image_size=8, seed=0)
    with pytest.raises(UserError, match=r"a class of train\+val has only 4 images, too few for 8 folds") as raised:
        data.cv_folds(8, seed=0)
    assert raised.value.flags() == " (--folds)"  # the library names the option; the command line its flag


def test_per_patient_sub_folders_are_groups_and_never_cross_splits(tmp_path):
    for label in ("covid", "normal"):
        for patient in range(10):
            _folder(tmp_path, {f"{label}/{label}-patient {patient}": 4})
    data = load_dataset(tmp_path, image_size=8, seed=0)
    assert "grouped" in data.split_kind and "per-patient sub-folders" in data.source
    assert len(set(data.groups)) == 20 and all(len(s) == 1 for s in _splits_of(data).values())


def test_a_patient_in_two_given_splits_is_refused_by_name(tmp_path):
    _folder(tmp_path, {"train/a/p1": 3, "train/b/p2": 3, "train/a/p3": 3, "train/b/p4": 3, "test/a/p1": 2,
                       "test/b/p5": 2})
    with pytest.raises(UserError, match=r"1 patient\(s\) have images in more than one given split.*p1 \(train, test\)"):
        load_dataset(tmp_path, image_size=8)


@pytest.mark.parametrize("layout", [("train", "validation"), ("Train", "VALID"), ("training", "dev"),
                                    ("train", "val"), ("TRAIN", "Val", "Testing"), ("train", "holdout"),
                                    ("train",)])
def test_split_folder_names_and_the_missing_splits_carved_by_seed(tmp_path, layout):
    names = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
             "testing": "test", "holdout": "test"}
    sizes = {"train": 30, "val": 6, "test": 6}
    for folder in layout:
        _folder(tmp_path, {f"{folder}/a": sizes[names[folder.lower()]], f"{folder}/b": sizes[names[folder.lower()]]})
    data = load_dataset(tmp_path, image_size=8, seed=3)
    given = {names[f.lower()] for f in layout}
    carved = [s for s in ("test", "val") if s not in given]
    counts = {s: sum(c.values()) for s, c in data.counts().items()}
    for split in given:
        if split != "train":
            assert counts[split] == 12  # a given split is kept as it is
    assert all(counts[s] > 0 for s in ("train", "val", "test"))
    if carved:
        assert f"{' and '.join(carved)} carved from train by seed 3" in data.split_kind
        again = load_dataset(tmp_path, image_size=8, seed=3)
        assert np.array_equal(data.split, again.split)
    else:
        assert data.split_kind == "given"


def _encodings():
    """The same gradient as float in [0, 1], as Hounsfield units (signed, -1000..1000) and as
    12-bit values in 16 bits, with the 8-bit image each should decode to."""
    ramp = np.linspace(0, 1, 24 * 24).reshape(24, 24)
    expected = np.round(ramp * 255).astype(np.uint8)
    return {"float01": (ramp.astype(np.float32), expected),
            "signed_hu": (np.round(ramp * 2000 - 1000).astype(np.int16), expected),
            "uint16": (np.round(ramp * 4095).astype(np.uint16), expected)}


@pytest.mark.parametrize("encoding", ["float01", "signed_hu", "uint16"])
def test_every_encoding_decodes_the_same_from_files_from_npz_and_for_predict(tmp_path, encoding):
    from ingest.decoding import decode_images
    pixels, expected = _encodings()[encoding]
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for k in range(6):
            image = Image.fromarray(pixels.astype(np.int32) if encoding == "signed_hu" else pixels)
            image.save(tmp_path / "folder" / name / f"{k}.tif")
    stack = np.repeat(pixels[None], 12, 0)
    np.savez(tmp_path / "d.npz", train_images=stack, train_labels=np.array([0, 1] * 6),
             test_images=stack[:4], test_labels=np.array([0, 1, 0, 1]), val_images=stack[:4],
             val_labels=np.array([0, 1, 0, 1]))
    from_files = load_dataset(tmp_path / "folder", image_size=24).images
    from_npz = load_dataset(tmp_path / "d.npz", image_size=24).images
    for_predict, _, _ = decode_images(sorted((tmp_path / "folder" / "a").glob("*.tif")), image_size=24, channels=1)
    assert np.abs(from_files[0, ..., 0].astype(int) - expected).max() <= 1  # not black, not clipped
    assert np.array_equal(from_files[0], from_npz[0]) and np.array_equal(for_predict[0], from_files[0])


def test_pixels_no_8bit_image_can_show_are_refused_by_name(tmp_path):
    broken = np.full((8, 8), np.nan, np.float32)
    np.savez(tmp_path / "d.npz", train_images=np.stack([broken] * 4), train_labels=np.array([0, 1, 0, 1]))
    with pytest.raises(UserError, match=r"d.npz: train_images image #0: the image has NaN or infinite pixels"):
        load_dataset(tmp_path / "d.npz", image_size=8)
    _folder(tmp_path / "f", {"a": 3, "b": 3})
    frames = [Image.fromarray(np.zeros((8, 8), np.uint8)), Image.fromarray(np.ones((8, 8), np.uint8))]
    frames[0].save(tmp_path / "f" / "a" / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(UserError, match=r"stack.tif \(it holds 2 frames \(a stack\); save one image per file\)"):
        load_dataset(tmp_path / "f", image_size=8)


def test_a_subset_just_below_a_splits_size_keeps_exactly_the_limit(tmp_path):
    """2,001 val images and --subset 2000 once failed inside scikit-learn: one image left out cannot
    be stratified over two classes."""
    x, y = np.zeros((25, 8, 8), np.uint8), np.array([0, 1] * 12 + [0])
    np.savez(tmp_path / "d.npz", train_images=x, train_labels=y, val_images=x[:11], val_labels=y[:11],
             test_images=x[:4], test_labels=y[:4])
    data = load_dataset(tmp_path / "d.npz", image_size=8, subset=10)
    assert len(data.indices("val")) == 10 and len(data.indices("train")) == 10 and len(data.indices("test")) == 4
    assert set(data.labels[data.indices("val")]) == {0, 1}


def test_patient_folders_belong_to_their_class(tmp_path):
    """Patient folders numbered per class (covid/1, normal/1) are different people: 20 patients, and
    given splits that put covid/1 in train and normal/1 in test leak nothing."""
    for label in ("covid", "normal"):
        for patient in range(10):
            _folder(tmp_path / "flat", {f"{label}/{patient}": 3})
    data = load_dataset(tmp_path / "flat", image_size=8, seed=0)
    assert len(set(data.groups)) == 20 and "covid/1" in set(data.groups)
    _folder(tmp_path / "given", {"train/covid/1": 3, "train/normal/2": 3, "test/normal/1": 2, "test/covid/2": 2,
                                 "val/covid/3": 2, "val/normal/4": 2})
    given = load_dataset(tmp_path / "given", image_size=8, seed=0)
    assert given.counts()["test"] == {"covid": 2, "normal": 2}


def test_a_manifest_written_on_windows_is_read(tmp_path):
    _folder(tmp_path, {"images/normal": 6, "images/covid": 6})
    rows = [f"images\\{c}\\{k}.png,{c}" for c in ("normal", "covid") for k in range(6)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(tmp_path / "m.csv", image_size=8, seed=0)
    assert len(data.labels) == 12 and data.paths[0] == "images/normal/0.png"
    (tmp_path / "bad.csv").write_text("path,label\nimages\\normal\\9.png,normal\n")
    with pytest.raises(UserError, match=r"1 listed file\(s\) do not exist: images/normal/9.png"):
        load_dataset(tmp_path / "bad.csv")


def test_a_manifest_saved_by_a_european_spreadsheet_is_read(tmp_path):
    """A byte-order mark and ';' between fields (a path with a ',' in it stays whole)."""
    _folder(tmp_path, {"images/normal": 6, "images/covid, ct": 6})
    rows = [f"images/{c}/{k}.png;{c.split(',')[0]};{'test' if k == 0 else 'val' if k == 1 else 'train'}"
            for c in ("normal", "covid, ct") for k in range(6)]
    (tmp_path / "m.csv").write_bytes("\ufeffpath;label;split\n".encode() + "\n".join(rows).encode() + b"\n")
    data = load_dataset(tmp_path / "m.csv", image_size=8, seed=0)
    assert len(data.labels) == 12 and data.class_names == ["covid", "normal"]
    assert data.counts()["test"] == {"covid": 1, "normal": 1}


def test_dropping_leaked_copies_that_empties_a_class_of_a_split_is_one_clear_error(tmp_path):
    """val's only image of class b is a copy of a test image: once the copy is dropped, val has no b;
    that is said before any trial, not by scikit-learn inside every trial."""
    from search.data.search_data import audited
    rng = np.random.default_rng(0)
    for name, n in {"train/a": 6, "train/b": 6, "val/a": 2, "test/a": 2, "test/b": 2}.items():
        (tmp_path / name).mkdir(parents=True)
        for k in range(n):  # every file different
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / name / f"{k}.png")
    (tmp_path / "val" / "b").mkdir()
    (tmp_path / "val" / "b" / "copy.png").write_bytes((tmp_path / "test" / "b" / "1.png").read_bytes())
    data = load_dataset(tmp_path, image_size=8)
    audited(data, dedupe=False)  # kept: no error
    with pytest.raises(UserError, match=r"split 'val' has no images of class\(es\) \['b'\] once the 1 copies .*--no-dedupe"):
        audited(data, dedupe=True)


def test_the_audit_warns_of_a_class_with_fewer_than_10_images_in_a_split(tmp_path):
    from ingest.leakage import audit_dataset
    _folder(tmp_path, {"train/a": 12, "train/b": 12, "val/a": 10, "val/b": 10, "test/a": 10, "test/b": 3})
    warnings = audit_dataset(load_dataset(tmp_path, image_size=8))["warnings"]
    assert [w for w in warnings if w.startswith("FEW")] == [
        "FEW: fewer than 10 images of a class in a split: test b (3); a metric on so few images is mostly chance "
        "(its interval in the report says how wide)"]
