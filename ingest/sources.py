"""The three sources a data set can come from, each read into `Raw` (decoded images, labels, the
given split, groups, paths, a fingerprint); `ingest.dataset` validates and splits what they read.

- an image folder: one sub-folder per class, or `train/` `val/` `test/` sub-folders that each hold
  the class folders; images in `class/<patient>/` sub-folders are grouped by that folder;
- a MedMNIST-style `.npz` (`train_images`, `train_labels`, `val_images`, ...);
- a CSV manifest with columns `path,label`, optionally `split` and a group column (patient id).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.errors import UserError
from ingest.decoding import Decoding, cache_arrays, decode_files, raise_unreadable
from ingest.files import IMAGE_EXTENSIONS, files_under, listing, relative_paths, unread_line
from ingest.image_file import auto_image_size, native_side, resize_array, to_channels
from ingest.stores import DiskImages

SPLITS = ("train", "val", "test")
# the names people give the three splits (folder names and manifest values, any case)
SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                      "dev": "val", "test": "test", "testing": "test", "holdout": "test"}
GROUP_COLUMN_NAMES = ("group", "patient_id", "patient", "subject_id", "subject", "case_id")
MEDMNIST_CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"]}


@dataclass
class Raw:
    images: np.ndarray | DiskImages
    labels: list  # class names or integer ids, one per image
    given_split: np.ndarray | None  # per image 'train' / 'val' / 'test', or None
    groups: np.ndarray | None
    paths: list[str] | None
    fingerprint: str
    source: str
    class_names: list[str] | None = None  # for integer labels
    root: str | None = None
    file_infos: list[dict] | None = None  # per image file: sha256, format, mode, size (the decoding pass's)
    unread: Counter = field(default_factory=Counter)  # files under the data left unread, by kind
    strata: dict[str, list[str]] = field(default_factory=dict)  # manifest columns recorded per image


def _list_folder(root: Path):
    """An image folder's layout, checked without decoding an image: its (class folder, split) pairs,
    the split folders, each image file with the index of its pair, and the files left unread."""
    subdirs = _visible_dirs(root)
    split_dirs = {d: SPLIT_FOLDER_NAMES[d.name.lower()] for d in subdirs
                  if d.name.lower() in SPLIT_FOLDER_NAMES}
    unread = Counter()
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
        classes = [(cls, split) for d, split in split_dirs.items() for cls in _visible_dirs(d)]
        unread["files outside class folders"] += sum(1 for d in split_dirs for p in d.iterdir() if p.is_file())
    else:
        classes = [(cls, None) for cls in subdirs]
    check_spellings([cls.name for cls, _ in classes], f"the class folders of {root}")
    files, owner = [], []  # each image file, and the index of its (class folder, split) in `classes`
    for k, (cls, _) in enumerate(classes):
        found, skipped = files_under(cls)
        files += found
        owner += [k] * len(found)
        unread += skipped
    loose = [p for p in root.iterdir() if p.is_file()]
    unread["files outside class folders"] += len(loose)
    if not files:
        images = [p.name for p in loose if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = f"; the {len(images)} images directly in it need one sub-folder per class" if images else ""
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}, or DICOM without an extension) found in class "
                        f"folders under {root}{hint}")
    return classes, split_dirs, files, owner, unread


def _load_folder(root: Path, *, decoding: Decoding, group_column, skip_corrupt) -> Raw:
    classes, split_dirs, files, owner, unread = _list_folder(root)
    decoded, kept, unread = _decode(root, files, decoding, skip_corrupt, unread)
    owner = [owner[i] for i in kept]
    given = np.array([classes[k][1] for k in owner]) if split_dirs else None
    paths = relative_paths([files[i] for i in kept], root)
    infos = decoded.infos
    # class/<patient>/<image>: the first sub-folder is the patient, named with its class (patient folders are
    # usually numbered per class: covid/1 and normal/1 are two people); an image right in its class folder is its own
    skip = 2 if split_dirs else 1  # [split/]class/
    nested = [rel.count("/") > skip for rel in paths]
    groups, how = None, ""
    if any(nested):
        groups = np.array(["/".join(rel.split("/")[skip - 1:skip + 1]) if deeper else rel
                           for rel, deeper in zip(paths, nested)])
        how = " (groups: per-patient sub-folders of each class)"
    elif any(i.get("patient_id") for i in infos):
        groups, how = _dicom_patients(infos, paths), " (groups: DICOM PatientID)"
    names = [cls.name for cls, _ in classes]
    return Raw(images=decoded.images, labels=[names[k] for k in owner], given_split=given, groups=groups,
               paths=paths, fingerprint=decoded.fingerprint, root=str(root), source=f"folder:{root}{how}",
               file_infos=infos, unread=unread)


def _decode(root: Path, files: list, decoding: Decoding, skip_corrupt: bool, unread: Counter):
    """Decode the files of a folder or manifest; returns the decoded data, the indices of the files
    kept (in order), and the unread files counted by kind."""
    if decoding.image_size == "auto":
        decoding = replace(decoding, image_size=auto_image_size(native_side(files)))
    decoded = decode_files(files, root, decoding)
    raise_unreadable(decoded, skip_corrupt=skip_corrupt)
    unread = unread + Counter({f"DICOM objects without pixel data ({kind})": n for kind, n in decoded.no_image.items()})
    if unread:
        print(f"data: left unread under {root}: {unread_line(unread)}", flush=True)
    kinds = Counter(i["kind"] for i in decoded.infos if i.get("kind"))
    if kinds:
        print(f"note: {', '.join(f'{n} {kind} image(s)' for kind, n in sorted(kinds.items()))} under {root} train like "
              f"the others (a localizer is a low-dose scout of the scan, a secondary capture a copy of a screen); "
              f"leave them out of the folder or manifest if the model should not learn from them", flush=True)
    return decoded, np.flatnonzero(decoded.keep), unread


def _dicom_patients(infos: list[dict], paths: list[str]) -> np.ndarray:
    """Patient ids from the DICOM PatientID tag; an image without one (blanked by de-identification,
    or not DICOM) is its own group, and a warning says how many."""
    blank = sum(not i.get("patient_id") for i in infos)
    if blank:
        warnings.warn(f"{blank} of {len(infos)} images have no DICOM PatientID (a de-identified export may blank it); "
                      f"each of them is its own patient in splits and intervals", stacklevel=3)
    return np.array([i.get("patient_id") or f"file:{p}" for i, p in zip(infos, paths)])


def _load_npz(path: Path, *, decoding: Decoding, group_column, skip_corrupt) -> Raw:
    try:
        arrays = np.load(path)
        keys = set(arrays.files)
    except Exception as exc:  # np.load raises many kinds on a bad file
        raise UserError(f"cannot read {path} as a .npz file: {exc}") from None
    splits = [s for s in SPLITS if f"{s}_images" in keys]
    if "train" not in splits or "train_labels" not in keys:
        raise UserError(f"{path} is not a MedMNIST-style .npz: expected train_images and train_labels "
                        f"(and optionally val_/test_), found {sorted(keys)}")
    size = auto_image_size(min(arrays["train_images"].shape[1:3])) if decoding.image_size == "auto" else decoding.image_size
    channels = decoding.channels
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
    images, fingerprint = np.concatenate(images), _sha256_file(path)
    decoding = replace(decoding, image_size=size)
    store = decoding.store(images.nbytes) if callable(decoding.store) else decoding.store
    decoding.chosen.update(store=store, bytes=int(images.nbytes))
    if store == "disk":
        if decoding.cache is None:
            raise UserError("the disk data store needs a cache folder", option="data_cache")
        images = cache_arrays(images, fingerprint, decoding)
    return Raw(images=images, labels=list(y), given_split=np.array(given), groups=None,
               paths=None, fingerprint=fingerprint, source=f"npz:{path}", class_names=names)


def _read_manifest(path: Path, group_column: str | None, strata_columns: tuple[str, ...] = ()):
    """The manifest's table, checked (columns, rows, listed files, split values) without decoding an
    image; with the files it lists, its group column and the given split per row."""
    try:
        # a spreadsheet saved in a European locale separates fields with ';' and may begin with a BOM
        header = path.read_text(encoding="utf-8-sig", errors="replace").split("\n", 1)[0]
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            sep=";" if header.count(";") > header.count(",") else ",")
    except Exception as exc:
        raise UserError(f"cannot read manifest {path}: {exc}") from None
    columns = list(table.columns)
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise UserError(f"manifest {path} lacks column(s) {missing}; it needs path,label and may have "
                        f"split and a group column, found {columns}")
    if group_column is not None and group_column not in columns:
        raise UserError(f"the group column {group_column!r} is not a column of {path}; columns: {columns}",
                        option="group_column")
    group = group_column or next((c for c in GROUP_COLUMN_NAMES if c in columns), None)
    absent = [c for c in strata_columns if c not in columns]
    if absent:
        raise UserError(f"strata column(s) {absent} are not columns of {path}; columns: {columns}")
    allowed = {"path", "label", "split", group, *strata_columns}
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise UserError(f"manifest {path} has unknown column(s) {unknown}; allowed: path, label, split, "
                        f"one group column ({', '.join(GROUP_COLUMN_NAMES)}, or one named as the group column) "
                        f"and the columns named as strata", option=("group_column", "strata"))
    if table.empty:
        raise UserError(f"manifest {path} has no rows")
    check_spellings(list(table["label"]), f"the label column of manifest {path}")
    table["path"] = [_native(path.parent, p) for p in table["path"]]
    files = [os.path.join(path.parent, p) for p in table["path"]]
    absent = [str(p) for p, f in zip(table["path"], files) if not os.path.isfile(f)]
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
    return table, files, group, given


def check_spellings(names: list[str], where: str) -> None:
    """Refuse class names that differ only in case or surrounding spaces (`normal`, `Normal `, as
    spreadsheets and hand-made folders leave them): each would train as a class of its own. Not merged
    silently: which spelling is meant, and whether the two really are one class, is the user's call.

    Raises:
        UserError: naming every such set of spellings.
    """
    spellings: dict[str, set[str]] = {}
    for name in names:
        spellings.setdefault(str(name).strip().casefold(), set()).add(str(name))
    clashes = [sorted(found) for found in spellings.values() if len(found) > 1]
    if clashes:
        raise UserError(f"{where} spell one class several ways: " + "; ".join(" / ".join(map(repr, c)) for c in clashes)
                        + ", differing only in case or spaces; each would train as a class of its own. Rename them "
                          "to one spelling")


def _native(folder: Path, listed: str) -> str:
    """A manifest's path as this machine names it: one written on Windows (`images\\normal\\1.png`)
    with '/' when no file has the name as written."""
    if "\\" in listed and os.sep == "/" and not os.path.isfile(os.path.join(folder, listed)):
        return listed.replace("\\", "/")
    return listed


def _load_manifest(path: Path, *, decoding: Decoding, group_column, skip_corrupt, strata_columns=()) -> Raw:
    table, files, group, given = _read_manifest(path, group_column, strata_columns)
    decoded, kept, unread = _decode(path.parent, files, decoding, skip_corrupt, Counter())
    table, infos = table.iloc[kept], decoded.infos
    paths = list(table["path"])
    groups, how = (table[group].to_numpy(), f" (groups: {group})") if group else (None, "")
    if group is None and any(i.get("patient_id") for i in infos):
        groups, how = _dicom_patients(infos, paths), " (groups: DICOM PatientID)"
    return Raw(images=decoded.images, labels=list(table["label"]),
               given_split=given[kept] if given is not None else None, groups=groups, paths=paths,
               fingerprint=_sha256_file(path)[:16] + decoded.fingerprint[:16],
               source=f"manifest:{path}{how}", root=str(path.parent), file_infos=infos, unread=unread,
               strata={c: [str(v).strip() for v in table[c]] for c in strata_columns})


def _check_npz(path: Path, group_column) -> None:
    try:
        np.load(path).files
    except Exception as exc:  # np.load raises many kinds on a bad file
        raise UserError(f"cannot read {path} as a .npz file: {exc}") from None


# name: (whether a path is this source, its loader, its checks that decode nothing)
DATA_SOURCES: dict[str, tuple[Callable[[Path], bool], Callable[..., Raw], Callable[..., object]]] = {
    "folder": (lambda p: p.is_dir(), _load_folder, lambda p, group_column: _list_folder(p)),
    "npz": (lambda p: p.suffix.lower() == ".npz", _load_npz, _check_npz),
    "manifest": (lambda p: p.suffix.lower() == ".csv", _load_manifest, _read_manifest),
}


def _visible_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def _names_of(split: str) -> str:
    return ", ".join(name for name, s in SPLIT_FOLDER_NAMES.items() if s == split)
