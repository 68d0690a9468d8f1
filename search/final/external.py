"""External validation: the final model on labelled data from elsewhere, with the internal test's
read-out (AUC with intervals over patients, sensitivity, specificity, PPV, NPV, calibration) and the
drop from the internal test stated. A model that scores 0.99 on its own data's test split may have
learned the hospital, not the disease; another hospital's images say which.

    python -m search.finalize --experiment experiments/lite-x --external ../shared/data/covid-ct-ucsd/patients.csv

Nothing is fitted on an external set: the threshold and temperature are the model's, chosen on its own
validation images. The sets are loaded and their classes matched by `search.data.external_sets`.

Example:
    >>> figures, probs = evaluate_external(load_model("final/ensemble"), ext, internal=test_figures)
    >>> figures["auc"], figures["drop"]["auc"]
"""
from __future__ import annotations

import re

import numpy as np

from core.formatting import figure, interval
from search.data.external_sets import External
from search.final.strata import strata_figures
from search.outputs.calibration import calibration
from search.outputs.evaluate import evaluate

COMPARED = ("auc", "sensitivity", "specificity", "accuracy")


def evaluate_external(model, external: External, *, internal: dict | None, resamples: int = 1000) -> tuple[dict, np.ndarray]:
    """The read-out of `model` (a `search.final.saved_model.SavedModel`) on `external`, with the drop from
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

