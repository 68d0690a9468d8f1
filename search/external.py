"""External validation: the final model on labelled data from elsewhere, with the internal test's
read-out (AUC with intervals over patients, sensitivity, specificity, PPV, NPV, calibration) and the
drop from the internal test stated. A model that scores 0.99 on its own data's test split may have
learned the hospital, not the disease; another hospital's images say which.

    python -m search.finalize --experiment experiments/lite-x --external ../shared/data/covid-ct-ucsd/patients.csv

Nothing is fitted on an external set: the threshold and temperature are the model's, chosen on its own
validation images. Classes are matched by name, ignoring case, spaces and punctuation (`non-COVID` is
`NonCOVID`); `--class-map THEIRS=OURS` names the model's class for a set's own where names differ beyond
that. A set lacking one of the model's classes, or holding one it does not know, is refused: its AUC,
sensitivity and specificity would not be the ones they claim. Images whose file is also in the model's
own data (the same bytes) are left out and counted: they are not external.

Example:
    >>> ext = load_external("../shared/data/covid-ct-ucsd/patients.csv", model_classes=["COVID", "non-COVID"],
    ...                     image_size=96, channels=1)
    >>> figures, probs = evaluate_external(load_model("final/ensemble"), ext, internal=test_figures)
    >>> figures["auc"], figures["drop"]["auc"]
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from core.formatting import figure, interval
from core.errors import UserError
from search.calibration import calibration
from search.evaluate import evaluate
from search.strata import strata_figures
from trainables.ingest.dataset import Dataset, check_data, load_labelled

COMPARED = ("auc", "sensitivity", "specificity", "accuracy")


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


def evaluate_external(model, external: External, *, internal: dict | None, resamples: int = 1000) -> tuple[dict, np.ndarray]:
    """The read-out of `model` (a `search.saved_model.SavedModel`) on `external`, with the drop from
    `internal` (the internal test's figures; None: not known); and the probabilities it gave."""
    images, labels = external.data.arrays("test")
    probs = model.predict_proba(images)
    names, threshold = model.class_names, model.record["threshold"]
    positive = names.index(model.record["positive_class"])
    groups = external.data.groups
    figures = evaluate(labels, probs, names, positive=positive, threshold=threshold, resamples=resamples, groups=groups)
    figures["calibration"] = calibration(labels, probs)
    figures.update(name=external.name, path=external.path, source=external.data.source,
                   fingerprint=external.data.fingerprint, matched=external.matched, left_out=external.left_out,
                   patients=None if groups is None else int(len(np.unique(groups))))
    if internal is not None:
        figures["drop"] = {k: internal[k] - figures[k] for k in COMPARED
                           if internal.get(k) is not None and figures.get(k) is not None}
        figures["below_internal"] = [k for k in ("auc", "sensitivity", "specificity") if figures["ci"].get(k)
                                     and internal.get(k) is not None and figures["ci"][k][1] < internal[k]]
    figures["strata"] = strata_figures(external.data, {"test_probs": probs, "val": {"threshold": threshold},
                                                       "test": figures}, positive=positive, resamples=resamples)
    return figures, probs


def file_stem(name: str) -> str:
    """A set's name as part of a file name: `external_<stem>_predictions.csv`."""
    name = re.sub(r"\.(csv|tsv|txt|json)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "set"


def external_lines(externals: list[dict], internal: dict | None, *, plot: str | None = None) -> list[str]:
    """The report's section on the external sets (`evaluate_external`'s figures), beside the internal test."""
    if not externals:
        return []
    lines = ["## External test sets", "",
             "The final model on labelled data from elsewhere, with its threshold and temperature as chosen on its "
             "own validation images: nothing was fitted on these sets. A drop from the internal test is what a change "
             "of hospital, scanner or population costs; a large one says the internal figures do not carry over. "
             "Intervals are 95%, over patients where the set names them.", "",
             "| test set | images | AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) | PPV | NPV | "
             "accuracy | ECE |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = ([("internal test", internal)] if internal else []) + [(f"**{e['name']}**", e) for e in externals]
    for label, f in rows:
        ci = f["ci"]
        patients = f" ({f['patients']} patients)" if f.get("patients") else ""
        ece = f"{f['calibration']['ece']:.3f}" if f.get("calibration") else "n/a"
        lines.append(f"| {label} | {f['images']}{patients} | {f['auc']:.3f} ({interval(ci['auc'])}) | "
                     f"{figure(f['sensitivity'])} ({interval(ci['sensitivity'])}) | {figure(f['specificity'])} "
                     f"({interval(ci['specificity'])}) | {figure(f['ppv'])} | {figure(f['npv'])} | {f['accuracy']:.3f} | {ece} |")
    for e in externals:
        lines += ["", f"**{e['name']}** (`{e['path']}`, fingerprint `{e['fingerprint']}`): classes matched "
                      + ", ".join(f"{t} as {o}" for t, o in e["matched"].items()) + "."]
        if e.get("left_out"):
            lines[-1] += f" {e['left_out']} image(s) whose file is also in the model's own data were left out."
        if e.get("drop"):
            lines[-1] += (" Drop from the internal test (internal minus external; below 0: better here): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in e["drop"].items()) + ".")
        if e["auc"] < 0.5:
            lines[-1] += (f" **AUC {e['auc']:.3f} is below chance**: the scores rank this set's classes the wrong way "
                          f"round, so what the model learned to tell them apart on its own data points the other way "
                          f"here (a cue of the source, not of the disease, is the likely reason).")
        if e.get("below_internal"):
            lines[-1] += (f" **Below the internal test**: the interval of {', '.join(e['below_internal'])} lies wholly "
                          f"below the internal figure.")
        names = list(e["per_class"])
        lines += ["", "| true \\ predicted | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        lines += [f"| {n} | " + " | ".join(map(str, row)) + " |" for n, row in zip(names, e["confusion_matrix"])]
    if plot:
        lines += ["", f"![ROC curves, internal and external]({plot})"]
    return lines

