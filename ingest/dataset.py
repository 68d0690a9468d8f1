"""Load labelled chest images once, validate them, split them, and hand out uint8 arrays.

The source is picked by what the path is (`ingest.sources.DATA_SOURCES`): an image folder, a
MedMNIST-style `.npz`, or a CSV manifest.

Example:
    >>> data = load_dataset("../shared/data/pneumoniamnist/pneumoniamnist.npz", image_size=32)
    >>> data.class_names, data.counts()["train"]
    (['normal', 'pneumonia'], {'normal': 1214, 'pneumonia': 1214})
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from core.errors import UserError
from ingest.decoding import Decoding
from core.choices import check_ct_window
from ingest.files import listing
from core.choices import check_image_size
from ingest.sources import DATA_SOURCES, SPLITS, Raw
from ingest.stores import STORES, DiskImages, rows


@dataclass
class Dataset:
    """Decoded images and everything known about them; the unit shared with all trials.

    `images` is uint8 of shape (N, H, W, C) with C = 1 (grayscale) or 3, in memory or (the disk
    store) a `DiskImages` handle whose rows are read as needed; `split` holds, per image, 0 (train),
    1 (val) or 2 (test).
    """

    images: np.ndarray | DiskImages
    labels: np.ndarray
    class_names: list[str]
    split: np.ndarray
    groups: np.ndarray | None
    paths: list[str] | None
    fingerprint: str
    source: str
    split_kind: str
    root: str | None = None  # the folder `paths` are relative to (None for arrays)
    file_infos: list[dict] | None = None  # per image file: sha256, format, mode, size (from decoding)
    unread: Counter = field(default_factory=Counter)  # files under the data that were not read, by kind
    store: dict = field(default_factory=dict)  # where the decoded images live: store, bytes, cache, reused
    # per image, what is recorded of it beyond its label (a DICOM header's manufacturer, sex, age band ...,
    # a manifest's strata columns): {attribute: values, "" where unknown}; the report breaks test figures down by it
    strata: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.images, DiskImages)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def for_training(self) -> "Dataset":
        """What a trial or retraining needs: the same data without the per-file records (paths, the
        decoding's file details), which on 200,000 files would be tens of MB in every worker."""
        return replace(self, paths=None, file_infos=None)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's images (in memory, or read as sliced from the disk store) and labels."""
        idx = self.indices(split)
        return rows(self.images, idx), self.labels[idx]

    def cv_folds(self, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """`k` folds of the train+val pool as (train, held-out) image indices: stratified by class,
        grouped by patient where groups exist, the same for the same `seed`. Test is in no fold.

        Raises:
            UserError: a held-out fold would lack a class (too few images or patients for `k`).
        """
        pool = np.sort(np.concatenate([self.indices("train"), self.indices("val")]))
        y = self.labels[pool]
        units = pool if self.groups is None else self.groups[pool]  # what a fold holds whole: images, or patients
        fewest = min(len(np.unique(units[y == c])) for c in np.unique(y))
        if fewest < k:
            raise UserError(f"a class of train+val has only {fewest} {'images' if self.groups is None else 'patients'}, "
                            f"too few for {k} folds; use fewer folds", option="folds")
        if self.groups is None:
            parts = StratifiedKFold(k, shuffle=True, random_state=seed).split(pool, y)
        else:
            parts = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(pool, y, self.groups[pool])
        folds = [(pool[train], pool[held_out]) for train, held_out in parts]
        for n, (_, held_out) in enumerate(folds):
            lacking = sorted(set(self.class_names) - {self.class_names[c] for c in self.labels[held_out]})
            if lacking:
                patients = f"{len(np.unique(self.groups[pool]))} patients, " if self.groups is not None else ""
                raise UserError(f"fold {n + 1} of {k} of train+val ({patients}{len(pool)} images) holds no image of "
                                f"{lacking}; use fewer folds", option="folds")
        return folds

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
               "counts": self.counts(), "store": self.store}
        if self.unread:
            out["unread"] = dict(self.unread)
        if self.groups is not None:
            out["groups_per_split"] = {s: int(len(np.unique(self.groups[self.indices(s)])))
                                       for s in SPLITS}
        return out


def load_dataset(path: str | os.PathLike, *, image_size: int | str = 32, channels: int = 1, seed: int = 0,
                 group_column: str | None = None, skip_corrupt: bool = False, subset: int | None = None,
                 ct_window: str = "lung", store: str | Callable[[int], str] = "memory", cache: str | None = None,
                 run_chunks: Callable | None = None, strata_columns: tuple[str, ...] = ()) -> Dataset:
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
        ct_window: the window CT DICOM files are shown in (`core.choices.check_ct_window`).
        store: "memory", "disk" (the decoded images in `cache`, read by rows), or a function of the
            decoded size in bytes that picks one.
        cache: folder of decoded data sets, reused when the same files are decoded the same way.
        run_chunks: how decoding chunks run (`ingest.decoding.Decoding`; default local threads).
        strata_columns: manifest columns recorded per image as strata (DICOM attributes are recorded
            without asking).

    Raises:
        UserError: naming the bad path, image, column, class or split.
    """
    path = Path(path).expanduser()
    _source(path)
    check_image_size(image_size)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    check_ct_window(ct_window)
    if not callable(store) and store not in STORES:
        raise UserError(f"unknown data store {store!r}; choose one of {', '.join(STORES)}")
    decoding = Decoding(image_size=image_size, channels=channels, ct_window=ct_window, store=store,
                        cache=Path(cache) if cache else None, run_chunks=run_chunks)
    loader, _ = _source(path)
    _check_strata_source(path, strata_columns)
    extra = {"strata_columns": tuple(strata_columns)} if strata_columns else {}
    raw = loader(path, decoding=decoding, group_column=group_column, skip_corrupt=skip_corrupt, **extra)
    data = _finish(raw, seed=seed, subset=subset)
    data.store = dict(decoding.chosen)
    return data


def load_labelled(path: str | os.PathLike, *, image_size: int, channels: int, ct_window: str = "lung",
                  group_column: str | None = None, skip_corrupt: bool = False) -> Dataset:
    """Every image of a labelled data set in the test split (a split it gives is ignored): a set from
    elsewhere to test a finished model on, decoded as the model's own data was.

    Example:
        >>> external = load_labelled("../shared/data/covid-ct-ucsd/patients.csv", image_size=96, channels=1)
        >>> external.class_names, len(external.indices("test"))
        (['COVID', 'NonCOVID'], 746)

    Raises:
        UserError: as `load_dataset` for the same path.
    """
    path = Path(path).expanduser()
    loader, _ = _source(path)
    decoding = Decoding(image_size=image_size, channels=channels, ct_window=ct_window, store="memory", cache=None)
    raw = loader(path, decoding=decoding, group_column=group_column, skip_corrupt=skip_corrupt)
    labels, class_names = _label_ids(raw)
    return Dataset(images=raw.images, labels=labels, class_names=class_names,
                   split=np.full(len(labels), SPLITS.index("test")), groups=raw.groups, paths=raw.paths,
                   fingerprint=raw.fingerprint, source=raw.source, split_kind="external (every image tested)",
                   root=raw.root, file_infos=raw.file_infos, unread=raw.unread, strata=dicom_strata(raw.file_infos))


def check_data(path: str | os.PathLike, *, group_column: str | None = None, strata_columns: tuple[str, ...] = ()) -> None:
    """What `load_dataset` checks before it decodes anything (the path, a folder's layout, a
    manifest's columns, files and splits), in seconds: a search runs it before it starts Ray.

    Raises:
        UserError: as `load_dataset` would for the same data.
    """
    path = Path(path).expanduser()
    _, check = _source(path)
    _check_strata_source(path, strata_columns)
    check(path, group_column, *([tuple(strata_columns)] if strata_columns else []))


def _check_strata_source(path: Path, strata_columns) -> None:
    if strata_columns and path.suffix.lower() != ".csv":
        raise UserError(f"strata columns {list(strata_columns)} are columns of a CSV manifest; {path} is not one "
                        f"(a folder or .npz records no attribute per image but what DICOM headers say)")


def _source(path: Path):
    if not path.exists():
        raise UserError(f"data path {str(path)!r} does not exist; give an image folder, a .npz file or a .csv "
                        f"manifest", option="data")
    for matches, loader, check in DATA_SOURCES.values():
        if matches(path):
            return loader, check
    raise UserError(f"cannot read {str(path)!r}: expected an image folder, a .npz file or a .csv "
                    f"manifest (sources: {', '.join(DATA_SOURCES)})")


# ---- validation and splitting ----------------------------------------------------------------

def _label_ids(raw: Raw) -> tuple[np.ndarray, list[str]]:
    """Integer labels and the class names they index."""
    if raw.class_names is not None:
        return np.asarray(raw.labels, dtype=np.int64), raw.class_names
    names = [str(c) for c in raw.labels]
    class_names = sorted(set(names))
    return np.array([class_names.index(n) for n in names], dtype=np.int64), class_names


def _finish(raw: Raw, *, seed: int, subset: int | None) -> Dataset:
    labels, class_names = _label_ids(raw)
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        raise UserError(f"only one class ({class_names[present[0]]!r}) in {raw.source}; a classifier "
                        f"needs images of at least two classes")
    if raw.given_split is not None and raw.groups is not None:
        _check_groups_stay_in_their_split(raw)
    split, kind = _make_split(labels, raw.given_split, raw.groups, seed=seed)
    if subset is not None:
        split = _subsample(split, labels, subset, seed=seed)
    data = Dataset(images=raw.images, labels=labels, class_names=class_names, split=split,
                   groups=raw.groups, paths=raw.paths, fingerprint=raw.fingerprint, source=raw.source,
                   split_kind=kind, root=raw.root, file_infos=raw.file_infos, unread=raw.unread,
                   strata={**dicom_strata(raw.file_infos), **{k: np.asarray(v, dtype=str) for k, v in raw.strata.items()}})
    check_every_split_has_every_class(data)
    return data


def dicom_strata(infos: list[dict] | None) -> dict[str, np.ndarray]:
    """What DICOM headers record of each image (manufacturer, model, station, view, sex, age band),
    for the attributes at least one image has."""
    if not infos:
        return {}
    out = {}
    for key in ("manufacturer", "model", "station", "view", "sex", "age"):
        values = [age_band(i.get(key, "")) if key == "age" else str(i.get(key, "")) for i in infos]
        if any(values):
            out["age band" if key == "age" else key] = np.asarray(values, dtype=str)
    return out


def age_band(age: str) -> str:
    """A DICOM PatientAge ("045Y", "018M", "003W", "010D") as a decade band ("40-49"); "" if unreadable."""
    age = str(age).strip().upper()
    if len(age) != 4 or not age[:3].isdigit() or age[3] not in "DWMY":
        return ""
    years = int(age[:3]) if age[3] == "Y" else 0
    return f"{years // 10 * 10}-{years // 10 * 10 + 9}"


def check_every_split_has_every_class(data: Dataset, *, after: str = "") -> None:
    """Raises:
        UserError: a split lacks a class (`after`: what emptied it, for the message)."""
    for code, s in enumerate(SPLITS):
        present = set(data.labels[data.split == code].tolist())
        lacking = [data.class_names[k] for k in range(data.num_classes) if k not in present]
        if lacking:
            raise UserError(f"split {s!r} has no images of class(es) {lacking}{after} ({data.source}); every "
                            f"split needs every class: add images or change the split")


def _check_groups_stay_in_their_split(raw: Raw) -> None:
    """A patient whose images the data set itself puts in two splits leaks: refuse it, naming them."""
    splits_of: dict[str, set[str]] = {}
    for group, split in zip(raw.groups, raw.given_split):
        splits_of.setdefault(str(group), set()).add(str(split))
    crossing = [f"{g} ({', '.join(sorted(s, key=SPLITS.index))})" for g, s in splits_of.items() if len(s) > 1]
    if crossing:
        raise UserError(f"{len(crossing)} patient(s) have images in more than one given split, which leaks them "
                        f"into evaluation: {listing(crossing)} ({raw.source}); move each patient's images into "
                        f"one split, or give no split and let the search split by patient")


def _make_split(labels: np.ndarray, given, groups, *, seed: int) -> tuple[np.ndarray, str]:
    """Per-image split codes: the given split, with test and val carved from train where the data
    gives none; with no split given, 8:1:1 by seed. Carving is stratified, and grouped so that no
    patient crosses splits; the test split is carved first and never changed afterwards."""
    split = np.zeros(len(labels), np.uint8)
    if given is None:
        pool, carve, kind = np.arange(len(labels)), ("test", "val"), "stratified"
    else:
        split[:] = [SPLITS.index(s) for s in given]
        pool = np.flatnonzero(split == 0)
        carve = tuple(s for s in ("test", "val") if not (split == SPLITS.index(s)).any())
        kind = "given" + (f" ({' and '.join(carve)} carved from train by seed {seed})" if carve else "")
    if groups is not None:
        kind += ", grouped"
    rest = pool
    if "test" in carve:
        rest, test = _split_off(pool, labels, groups, 0.1, seed)
        split[test] = 2
    if "val" in carve:
        _, val = _split_off(rest, labels, groups, 0.1 / 0.9 if "test" in carve else 0.1, seed)
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
        raise UserError(f"a subset of {limit} image(s) per split is too small: keep at least two images per class",
                        option="subset")
    out = np.full_like(split, 255)  # 255: left out
    for code in range(len(SPLITS)):
        idx = np.flatnonzero(split == code)
        if len(idx) - limit >= len(np.unique(labels[idx])):
            idx, _ = train_test_split(idx, train_size=limit, stratify=labels[idx], random_state=seed)
        elif len(idx) > limit:  # fewer left out than there are classes: too few to stratify, and too few to matter
            idx = np.random.default_rng(seed).permutation(idx)[:limit]
        out[idx] = code
    return out
