"""The three sources a data set can come from, each read into `Raw` (decoded images, labels, the
given split, groups, paths, a fingerprint); `trainables.data` validates and splits what they read.

- an image folder: one sub-folder per class, or `train/` `val/` `test/` sub-folders that each hold
  the class folders; images in `class/<patient>/` sub-folders are grouped by that folder;
- a MedMNIST-style `.npz` (`train_images`, `train_labels`, `val_images`, ...);
- a CSV manifest with columns `path,label`, optionally `split` and a group column (patient id).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from trainables import UserError
from trainables.images import (IMAGE_EXTENSIONS, auto_image_size, decode_all, images_under, listing, resize_array,
                               to_channels)

SPLITS = ("train", "val", "test")
# the names people give the three splits (folder names and manifest values, any case)
SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                      "dev": "val", "test": "test", "testing": "test", "holdout": "test"}
GROUP_COLUMN_NAMES = ("group", "patient_id", "patient", "subject_id", "subject", "case_id")
MEDMNIST_CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"]}


@dataclass
class Raw:
    images: np.ndarray
    labels: list  # class names or integer ids, one per image
    given_split: np.ndarray | None  # per image 'train' / 'val' / 'test', or None
    groups: np.ndarray | None
    paths: list[str] | None
    fingerprint: str
    source: str
    class_names: list[str] | None = None  # for integer labels
    root: str | None = None


def _load_folder(root: Path, *, image_size: int, channels: int, group_column, skip_corrupt) -> Raw:
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
            raise UserError(f"{root} has split folders ({', '.join(sorted(d.name for d in split_dirs))}) but no "
                            f"training one; name it one of {_names_of('train')}")
        entries = [(p, cls, split) for d, split in split_dirs.items() for cls in _visible_dirs(d)
                   for p in images_under(cls)]
    else:
        entries = [(p, cls, None) for cls in subdirs for p in images_under(cls)]
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
    paths = [str(p.relative_to(root)) for p, _, _ in entries]
    # class/<patient>/<image>: the first sub-folder is the patient; an image right in its class folder is its own
    inside = [p.relative_to(cls).parts for p, cls, _ in entries]
    groups = np.array([parts[0] if len(parts) > 1 else path for parts, path in zip(inside, paths)]) \
        if any(len(parts) > 1 for parts in inside) else None
    return Raw(images=images, labels=[cls.name for _, cls, _ in entries], given_split=given, groups=groups,
                paths=paths,
                fingerprint=_file_list_fingerprint(root, files), root=str(root),
                source=f"folder:{root}" + (" (groups: per-patient sub-folders)" if groups is not None else ""))


def _load_npz(path: Path, *, image_size: int, channels: int, group_column, skip_corrupt) -> Raw:
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
        try:
            images.append(resize_array(to_channels(x, channels), size))
        except UserError as exc:
            raise UserError(f"{path}: {s}_images {exc}") from None
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
    return Raw(images=np.concatenate(images), labels=list(y), given_split=np.array(given), groups=None,
                paths=None, fingerprint=_sha256_file(path), source=f"npz:{path}", class_names=names)


def _load_manifest(path: Path, *, image_size: int, channels: int, group_column, skip_corrupt) -> Raw:
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
            raise UserError(f"manifest {path}: unknown split value(s) {bad}; use "
                            + "; ".join(f"{_names_of(split)} for {split}" for split in SPLITS) + " (any case)")
        given = given.to_numpy()
    images, keep = decode_all(files, image_size=image_size, channels=channels, skip_corrupt=skip_corrupt)
    table = table[keep]
    return Raw(images=images, labels=list(table["label"]),
                given_split=given[keep] if given is not None else None,
                groups=table[group].to_numpy() if group else None, paths=list(table["path"]),
                fingerprint=_sha256_file(path)[:16] + _file_list_fingerprint(path.parent, files)[:16],
                source=f"manifest:{path}" + (f" (groups: {group})" if group else ""), root=str(path.parent))


DATA_SOURCES: dict[str, tuple[Callable[[Path], bool], Callable[..., Raw]]] = {
    "folder": (lambda p: p.is_dir(), _load_folder),
    "npz": (lambda p: p.suffix.lower() == ".npz", _load_npz),
    "manifest": (lambda p: p.suffix.lower() == ".csv", _load_manifest),
}


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


def _names_of(split: str) -> str:
    return ", ".join(name for name, s in SPLIT_FOLDER_NAMES.items() if s == split)
