"""External test sets loaded as the search's data: decoded at the model's size and channels, their
classes matched to the model's, and the model's own images left out. The read-out on them is
`search.final.external`'s.

Classes are matched by name, ignoring case, spaces and punctuation (`non-COVID` is `NonCOVID`);
`--class-map THEIRS=OURS` names the model's class for a set's own where names differ beyond that. A
set lacking one of the model's classes, or holding one it does not know, is refused: its AUC,
sensitivity and specificity would not be the ones they claim. Images whose file is also in the
model's own data (the same bytes) are left out and counted: they are not external.

Example:
    >>> ext = load_external("../shared/data/covid-ct-ucsd/patients.csv", model_classes=["COVID", "non-COVID"],
    ...                     image_size=96, channels=1)
    >>> ext.left_out, ext.matched
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from core.errors import UserError
from ingest.dataset import Dataset, check_data, load_labelled

@dataclass
class External:
    """A labelled set from elsewhere, its labels as the model's class indices, every image in `test`."""

    name: str  # how the report and file names call it
    path: str
    data: Dataset  # class_names are the model's
    matched: dict[str, str]  # the set's class name -> the model's
    left_out: int  # images whose file is also in the model's own data


def parse_class_map(entries: list[str] | None) -> dict[str, str]:
    """`["NonCOVID=non-COVID", ...]` as {their name: the model's name}.

    Raises:
        UserError: an entry that is not THEIRS=OURS, or one name mapped twice.
    """
    mapping: dict[str, str] = {}
    for entry in entries or []:
        theirs, sep, ours = str(entry).partition("=")
        if not sep or not theirs.strip() or not ours.strip():
            raise UserError(f"--class-map {entry!r}: write THEIRS=OURS, the external set's class name and the model's "
                            f"class it is (e.g. NonCOVID=non-COVID)")
        if theirs.strip() in mapping:
            raise UserError(f"--class-map names {theirs.strip()!r} twice")
        mapping[theirs.strip()] = ours.strip()
    return mapping


def check_externals(paths: list[str] | None, class_map: list[str] | None) -> None:
    """What can be checked of `--external` and `--class-map` before any data is decoded.

    Raises:
        UserError: a path that is not there or not a readable data set, a bad mapping.
    """
    if paths is not None and (isinstance(paths, str) or not all(isinstance(p, str) and p for p in paths)):
        raise UserError(f"--external must be a list of data paths, got {paths!r}")
    if class_map is not None and (isinstance(class_map, str) or not all(isinstance(m, str) for m in class_map)):
        raise UserError(f"--class-map must be a list of THEIRS=OURS entries, got {class_map!r}")
    parse_class_map(class_map)
    if class_map and not paths:
        raise UserError("--class-map applies to the sets given with --external; none was given")
    for path in paths or []:
        if not Path(path).expanduser().exists():
            raise UserError(f"--external {path!r} does not exist; give a labelled image folder, .npz or CSV manifest")
        check_data(Path(path).expanduser())


def match_classes(theirs: list[str], ours: list[str], class_map: dict[str, str], where: str) -> dict[str, str]:
    """{their class: the model's class} for every class of the set.

    Raises:
        UserError: a class matching none of the model's, a mapping to a class the model lacks, or a class of
            the model with no image in the set.
    """
    def key(name: str) -> str:
        return re.sub(r"[\W_]+", "", name).casefold()

    wrong = {t: o for t, o in class_map.items() if o not in ours}
    if wrong:
        raise UserError(f"--class-map maps to {sorted(wrong.values())}, not classes of the model; its classes: {ours}")
    matched, unmatched = {}, []
    for name in theirs:
        same = [o for o in ours if key(o) == key(name)]
        if name in class_map or same:
            matched[name] = class_map.get(name) or same[0]
        else:
            unmatched.append(name)
    if unmatched:
        raise UserError(f"{where}: class(es) {unmatched} match none of the model's classes {ours} by name (case, spaces "
                        f"and punctuation aside); name the model's class for each with --class-map THEIRS=OURS")
    missing = [o for o in ours if o not in matched.values()]
    if missing:
        raise UserError(f"{where} has no image of the model's class(es) {missing} (its classes: {theirs}); an external "
                        f"test needs every class the model tells apart, or its AUC, sensitivity and specificity would "
                        f"not be what they claim")
    return matched


def load_external(path: str, *, model_classes: list[str], image_size: int, channels: int, ct_window: str = "lung",
                  class_map: dict[str, str] | None = None, own_files: set[str] | None = None,
                  own_fingerprint: str | None = None, skip_corrupt: bool = False, name: str | None = None) -> External:
    """A labelled set decoded as the model's data was, its classes matched to the model's, and the
    images whose file (sha256) is in `own_files` left out.

    Raises:
        UserError: as `check_externals` and `match_classes`; the set is the model's own data
            (`own_fingerprint`, or every file in `own_files`).
    """
    where = f"--external {path}"
    check_externals([path], None)
    data = load_labelled(path, image_size=image_size, channels=channels, ct_window=ct_window, skip_corrupt=skip_corrupt)
    if own_fingerprint and data.fingerprint == own_fingerprint:
        raise UserError(f"{where} is the data the model was trained and tested on (same fingerprint); its internal "
                        f"test is that read-out")
    keep = np.ones(len(data.labels), bool)
    if own_files and data.file_infos:
        keep = np.array([info.get("sha256") not in own_files for info in data.file_infos])
    if not keep.any():
        raise UserError(f"{where}: every image of it is also in the model's own data; it is no external test")
    data = _rows(data, keep)
    present = [data.class_names[c] for c in np.unique(data.labels)]
    matched = match_classes(present, model_classes, class_map or {}, where)
    labels = np.array([model_classes.index(matched[data.class_names[c]]) for c in data.labels], dtype=np.int64)
    given = Path(path).expanduser()
    return External(name=name or (given.name if given.is_dir() else f"{given.parent.name}/{given.name}"), path=path,
                    data=replace(data, labels=labels, class_names=list(model_classes)), matched=matched,
                    left_out=int((~keep).sum()))


def load_externals(paths: list[str] | None, class_map: list[str] | None, *, classes: list[str], image_size: int,
                   channels: int, ct_window: str = "lung", own_files: set[str] = frozenset(),
                   own_fingerprint: str | None = None, skip_corrupt: bool = False) -> list[External]:
    """Every `--external` set for a model of `classes` that sees `image_size` px and `channels`, none of
    `own_files` (sha256 of its own data's files) nor its data (`own_fingerprint`): `like(data)` gives them.

    Raises:
        UserError: as `load_external`; a `--class-map` name that is no class of any set.
    """
    mapping = parse_class_map(class_map)
    externals: list[External] = []
    for path in paths or []:
        ext = load_external(path, model_classes=classes, image_size=image_size, channels=channels,
                            ct_window=ct_window, class_map=mapping, own_files=own_files,
                            own_fingerprint=own_fingerprint, skip_corrupt=skip_corrupt)
        taken = {e.name for e in externals}
        ext.name = next(n for n in (ext.name, *(f"{ext.name}-{k}" for k in range(2, len(taken) + 3))) if n not in taken)
        print(f"external test set {ext.name}: {len(ext.data.labels)} images, classes "
              + ", ".join(f"{t} as {o}" for t, o in ext.matched.items())
              + (f"; {ext.left_out} image(s) also in the model's own data left out" if ext.left_out else ""), flush=True)
        externals.append(ext)
    unused = sorted(set(mapping) - {t for e in externals for t in e.matched})
    if unused:
        raise UserError(f"--class-map names {unused}, no class of the external sets (their classes: "
                        f"{sorted({t for e in externals for t in e.matched})})")
    return externals


def like(data: Dataset) -> dict:
    """What `load_externals` needs to know of a model trained on `data`."""
    return {"classes": data.class_names, "image_size": int(data.images.shape[1]), "channels": data.channels,
            "own_files": {info["sha256"] for info in data.file_infos or [] if info.get("sha256")},
            "own_fingerprint": data.fingerprint}


def _rows(data: Dataset, keep: np.ndarray) -> Dataset:
    if keep.all():
        return data
    idx = np.flatnonzero(keep)
    return replace(data, images=data.images[idx], labels=data.labels[idx], split=data.split[idx],
                   groups=None if data.groups is None else data.groups[idx],
                   paths=None if data.paths is None else [data.paths[i] for i in idx],
                   file_infos=None if data.file_infos is None else [data.file_infos[i] for i in idx],
                   strata={k: v[idx] for k, v in data.strata.items()})
