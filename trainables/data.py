"""Load labelled chest images once, validate them, split them, and hand out uint8 arrays.

Three sources, picked by what the path is (see `DATA_SOURCES`):

- an image folder: one sub-folder per class, or `train/` `val/` `test/` sub-folders that each
  hold the class folders;
- a MedMNIST-style `.npz` (`train_images`, `train_labels`, `val_images`, ...);
- a CSV manifest with columns `path,label`, optionally `split` and a group column (patient id).

Example:
    >>> data = load_dataset("../shared/data/pneumoniamnist/pneumoniamnist.npz", image_size=32)
    >>> data.class_names, data.counts()["train"]
    (['normal', 'pneumonia'], {'normal': 1214, 'pneumonia': 1214})
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from trainables import UserError
from trainables.images import (IMAGE_EXTENSIONS, auto_image_size, check_image_size, decode_all, images_under,
                               listing, resize_array, to_channels)

SPLITS = ("train", "val", "test")
SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                      "validation": "val", "test": "test", "testing": "test"}
GROUP_COLUMN_NAMES = ("group", "patient_id", "patient", "subject_id", "subject", "case_id")
MEDMNIST_CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"]}


@dataclass
class Dataset:
    """Decoded images and everything known about them; the unit shared with all trials.

    `images` is uint8 of shape (N, H, W, C) with C = 1 (grayscale) or 3; `split` holds, per
    image, 0 (train), 1 (val) or 2 (test).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    split: np.ndarray
    groups: np.ndarray | None
    paths: list[str] | None
    fingerprint: str
    source: str
    split_kind: str
    root: str | None = None  # the folder `paths` are relative to (None for arrays)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(split)
        return self.images[idx], self.labels[idx]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        out = {}
        for s in SPLITS:
            y = self.labels[self.indices(s)]
            out[s] = {name: int((y == k).sum()) for k, name in enumerate(self.class_names)}
        return out

    def summary(self) -> dict:
        """Plain-data description recorded with every output."""
        out = {"source": self.source, "fingerprint": self.fingerprint, "split_kind": self.split_kind,
               "class_names": self.class_names, "image_shape": list(self.images.shape[1:]),
               "counts": self.counts()}
        if self.groups is not None:
            out["groups_per_split"] = {s: int(len(np.unique(self.groups[self.indices(s)])))
                                       for s in SPLITS}
        return out


def load_dataset(path: str | os.PathLike, *, image_size: int | str = 32, channels: int = 1, seed: int = 0,
                 group_column: str | None = None, skip_corrupt: bool = False,
                 subset: int | None = None) -> Dataset:
    """Load, validate and split a data set; every image is decoded and resized here, once.

    Args:
        path: image folder, `.npz` file or `.csv` manifest.
        image_size: side of the square images handed to the trials, or "auto": 32 for images
            up to 48 px on their shorter side (the median of a sample), else 64.
        channels: 1 to convert every image to grayscale, 3 for RGB, whatever the file's mode.
        seed: seed of the stratified (or grouped) 8:1:1 split, used where none is given.
        group_column: manifest column holding patient ids; detected by name when omitted.
        skip_corrupt: leave unreadable images out with one warning instead of failing.
        subset: keep at most this many images per split (stratified), for smoke runs.

    Raises:
        UserError: naming the bad path, image, column, class or split.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data path {str(path)!r} does not exist; pass --data with an image folder, "
                        f"a .npz file or a .csv manifest")
    check_image_size(image_size)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    for name, (matches, loader) in DATA_SOURCES.items():
        if matches(path):
            raw = loader(path, image_size=image_size, channels=channels, group_column=group_column,
                         skip_corrupt=skip_corrupt)
            break
    else:
        raise UserError(f"cannot read {str(path)!r}: expected an image folder, a .npz file or a .csv "
                        f"manifest (sources: {', '.join(DATA_SOURCES)})")
    return _finish(raw, seed=seed, subset=subset)


# ---- sources -------------------------------------------------------------------------------

@dataclass
class _Raw:
    images: np.ndarray
    labels: list  # class names or integer ids, one per image
    given_split: np.ndarray | None  # per image 'train' / 'val' / 'test', or None
    groups: np.ndarray | None
    paths: list[str] | None
    fingerprint: str
    source: str
    class_names: list[str] | None = None  # for integer labels
    root: str | None = None


def _load_folder(root: Path, *, image_size: int, channels: int, group_column, skip_corrupt) -> _Raw:
    subdirs = _visible_dirs(root)
    split_dirs = {d: SPLIT_FOLDER_NAMES[d.name.lower()] for d in subdirs
                  if d.name.lower() in SPLIT_FOLDER_NAMES}
    if split_dirs:
        others = [d.name for d in subdirs if d not in split_dirs]
        if others:
            raise UserError(f"{root} mixes split folders ({', '.join(sorted(d.name for d in split_dirs))}) "
                            f"with other folders ({', '.join(sorted(others))}); put every class folder "
                            f"inside train/, val/ or test/")
        if len(set(split_dirs.values())) != len(split_dirs):
            raise UserError(f"{root} has two folders for one split: {sorted(d.name for d in split_dirs)}")
        if "train" not in split_dirs.values():
            raise UserError(f"{root} has split folders but no train/ folder")
        entries = [(p, cls.name, split) for d, split in split_dirs.items()
                   for cls in _visible_dirs(d) for p in images_under(cls)]
    else:
        entries = [(p, cls.name, None) for cls in subdirs for p in images_under(cls)]
    if not entries:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (f"; the {len(loose)} images directly in it need one sub-folder per class"
                if loose else "")
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in class folders under "
                        f"{root}{hint}")
    files = [p for p, _, _ in entries]
    images, keep = decode_all(files, image_size=image_size, channels=channels, skip_corrupt=skip_corrupt)
    entries = [e for e, k in zip(entries, keep) if k]
    given = np.array([s for _, _, s in entries]) if split_dirs else None
    return _Raw(images=images, labels=[c for _, c, _ in entries], given_split=given, groups=None,
                paths=[str(p.relative_to(root)) for p, _, _ in entries],
                fingerprint=_file_list_fingerprint(root, files), source=f"folder:{root}", root=str(root))


def _load_npz(path: Path, *, image_size: int, channels: int, group_column, skip_corrupt) -> _Raw:
    try:
        arrays = np.load(path)
        keys = set(arrays.files)
    except Exception as exc:  # np.load raises many kinds on a bad file
        raise UserError(f"cannot read {path} as a .npz file: {exc}") from None
    splits = [s for s in SPLITS if f"{s}_images" in keys]
    if "train" not in splits or "train_labels" not in keys:
        raise UserError(f"{path} is not a MedMNIST-style .npz: expected train_images and train_labels "
                        f"(and optionally val_/test_), found {sorted(keys)}")
    size = auto_image_size(min(arrays["train_images"].shape[1:3])) if image_size == "auto" else image_size
    images, labels, given = [], [], []
    for s in splits:
        if f"{s}_labels" not in keys:
            raise UserError(f"{path} has {s}_images but no {s}_labels")
        x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if y.ndim == 2 and y.shape[1] > 1:
            raise UserError(f"{path}: {s}_labels has shape {y.shape}; multi-label data is not supported")
        y = y.reshape(-1)
        if x.ndim not in (3, 4) or len(x) != len(y):
            raise UserError(f"{path}: {s}_images has shape {x.shape} for {len(y)} labels; expected "
                            f"(N, H, W) or (N, H, W, C)")
        images.append(resize_array(to_channels(x, channels), size))
        labels.append(y.astype(np.int64))
        given.extend([s] * len(y))
    y = np.concatenate(labels)
    if "class_names" in keys:
        names = [str(n) for n in arrays["class_names"]]
    else:
        names = MEDMNIST_CLASS_NAMES.get(path.stem.split("_")[0].lower(),
                                         [str(k) for k in range(int(y.max()) + 1)])
    if y.min() < 0 or y.max() >= len(names):
        raise UserError(f"{path}: labels range {y.min()}..{y.max()} does not fit the {len(names)} "
                        f"class names {names}")
    return _Raw(images=np.concatenate(images), labels=list(y), given_split=np.array(given), groups=None,
                paths=None, fingerprint=_sha256_file(path), source=f"npz:{path}", class_names=names)


def _load_manifest(path: Path, *, image_size: int, channels: int, group_column, skip_corrupt) -> _Raw:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise UserError(f"cannot read manifest {path}: {exc}") from None
    columns = list(table.columns)
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise UserError(f"manifest {path} lacks column(s) {missing}; it needs path,label and may have "
                        f"split and a group column, found {columns}")
    if group_column is not None and group_column not in columns:
        raise UserError(f"--group-column {group_column!r} is not a column of {path}; columns: {columns}")
    group = group_column or next((c for c in GROUP_COLUMN_NAMES if c in columns), None)
    allowed = {"path", "label", "split", group}
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise UserError(f"manifest {path} has unknown column(s) {unknown}; allowed: path, label, split "
                        f"and one group column ({', '.join(GROUP_COLUMN_NAMES)}, or name it with "
                        f"--group-column)")
    if table.empty:
        raise UserError(f"manifest {path} has no rows")
    files = [(path.parent / p) for p in table["path"]]
    absent = [str(p) for p, f in zip(table["path"], files) if not f.is_file()]
    if absent:
        raise UserError(f"manifest {path}: {len(absent)} listed file(s) do not exist: "
                        f"{listing(absent)} (paths are relative to the manifest's folder)")
    given = None
    if "split" in columns:
        given = table["split"].str.lower().map(SPLIT_FOLDER_NAMES)
        bad = sorted(set(table["split"][given.isna()]))
        if bad:
            raise UserError(f"manifest {path}: unknown split value(s) {bad}; use train, val or test")
        given = given.to_numpy()
    images, keep = decode_all(files, image_size=image_size, channels=channels, skip_corrupt=skip_corrupt)
    table = table[keep]
    return _Raw(images=images, labels=list(table["label"]),
                given_split=given[keep] if given is not None else None,
                groups=table[group].to_numpy() if group else None, paths=list(table["path"]),
                fingerprint=_sha256_file(path)[:16] + _file_list_fingerprint(path.parent, files)[:16],
                source=f"manifest:{path}" + (f" (groups: {group})" if group else ""), root=str(path.parent))


DATA_SOURCES: dict[str, tuple[Callable[[Path], bool], Callable[..., _Raw]]] = {
    "folder": (lambda p: p.is_dir(), _load_folder),
    "npz": (lambda p: p.suffix.lower() == ".npz", _load_npz),
    "manifest": (lambda p: p.suffix.lower() == ".csv", _load_manifest),
}


# ---- validation and splitting ----------------------------------------------------------------

def _finish(raw: _Raw, *, seed: int, subset: int | None) -> Dataset:
    if raw.class_names is not None:
        class_names = raw.class_names
        labels = np.asarray(raw.labels, dtype=np.int64)
        present = sorted(set(labels.tolist()))
        if len(present) < 2:
            raise UserError(f"only one class ({class_names[present[0]]!r}) in {raw.source}; a classifier "
                            f"needs images of at least two classes")
    else:
        names = [str(c) for c in raw.labels]
        class_names = sorted(set(names))
        if len(class_names) < 2:
            raise UserError(f"only one class ({class_names[0]!r}) in {raw.source}; a classifier needs "
                            f"images of at least two classes")
        labels = np.array([class_names.index(n) for n in names], dtype=np.int64)

    split, kind = _make_split(labels, raw.given_split, raw.groups, seed=seed)
    if subset is not None:
        split = _subsample(split, labels, subset, seed=seed)
    for s_code, s in enumerate(SPLITS):
        present = set(labels[split == s_code].tolist())
        lacking = [class_names[k] for k in range(len(class_names)) if k not in present]
        if lacking:
            raise UserError(f"split {s!r} has no images of class(es) {lacking} ({raw.source}); every "
                            f"split needs every class: add images or change the split")
    return Dataset(images=raw.images, labels=labels, class_names=class_names, split=split,
                   groups=raw.groups, paths=raw.paths, fingerprint=raw.fingerprint, source=raw.source,
                   split_kind=kind, root=raw.root)


def _make_split(labels: np.ndarray, given, groups, *, seed: int) -> tuple[np.ndarray, str]:
    """Per-image split codes: the given split, with val carved from train when it is missing;
    otherwise stratified 8:1:1 by seed, grouped so that no group crosses splits."""
    split = np.zeros(len(labels), np.uint8)
    if given is not None:
        split[:] = [SPLITS.index(s) for s in given]
        kind = "given"
        if (split == 1).any():
            return split, kind
        pool, test_share = np.flatnonzero(split == 0), 0.0
    else:
        pool, test_share, kind = np.arange(len(labels)), 0.1, "stratified"
    if groups is not None:
        kind += ", grouped"
    rest, val_share = pool, 0.1
    if test_share:
        rest, test = _split_off(pool, labels, groups, test_share, seed)
        split[test] = 2
        val_share = 0.1 / (1 - test_share)
    _, val = _split_off(rest, labels, groups, val_share, seed)
    split[val] = 1
    return split, kind


def _split_off(idx: np.ndarray, labels: np.ndarray, groups, share: float, seed: int):
    """Split `idx` into (rest, part) with `part` about `share` of it, stratified by label."""
    y = labels[idx]
    if groups is None:
        try:
            rest, part = train_test_split(idx, test_size=share, stratify=y, random_state=seed)
        except ValueError as exc:
            raise UserError(f"cannot make a stratified split: {exc}") from None
        return np.sort(rest), np.sort(part)
    n_folds = max(2, round(1 / share))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_folds:
        raise UserError(f"only {n_groups} groups to split; a grouped split needs at least {n_folds}")
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rest, part = next(folds.split(idx, y, groups[idx]))
    return np.sort(idx[rest]), np.sort(idx[part])


def _subsample(split: np.ndarray, labels: np.ndarray, limit: int, *, seed: int) -> np.ndarray:
    if limit < 2 * (labels.max() + 1):
        raise UserError(f"--subset {limit} is too small: keep at least two images per class")
    out = np.full_like(split, 255)  # 255: left out
    for code in range(len(SPLITS)):
        idx = np.flatnonzero(split == code)
        if len(idx) > limit:
            idx, _ = train_test_split(idx, train_size=limit, stratify=labels[idx], random_state=seed)
        out[idx] = code
    return out


# ---- helpers ---------------------------------------------------------------------------------

def _visible_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _file_list_fingerprint(root: Path, files: list[Path]) -> str:
    lines = sorted(f"{p.relative_to(root)}\t{p.stat().st_size}" for p in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]
