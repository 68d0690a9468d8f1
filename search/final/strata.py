"""The test figures broken down by what is recorded of each image: a DICOM header's manufacturer, scanner
model, station, view, sex and age band, or a manifest's columns named with `--strata`. A model can be
good on average and poor on one scanner or one group of patients; the report says which.

Per attribute and value with at least MIN_IMAGES test images: AUC (when both classes are there) with a
bootstrap interval over patients, and sensitivity / specificity at the validation threshold with Wilson
intervals. A stratum is flagged when its AUC or sensitivity interval lies wholly below the whole test
set's figure.

Example:
    >>> strata_figures(data, model, positive=1, resamples=1000)["manufacturer"]["GE"]["auc"]
"""
from __future__ import annotations

import numpy as np

from search.outputs.evaluate import auc, confidence_intervals, decide, rates

MIN_IMAGES = 10


def strata_figures(data, model: dict, *, positive: int, resamples: int) -> dict:
    """{attribute: {value: figures}} for the test split of `data` and the final `model` (its test
    probabilities and validation threshold); {} when nothing is recorded."""
    test = data.indices("test")
    labels, probs, threshold = data.labels[test], model["test_probs"], model["val"]["threshold"]
    groups = data.groups[test] if data.groups is not None else None
    whole = {"auc": model["test"]["auc"], "sensitivity": model["test"]["sensitivity"]}
    out = {}
    for attribute, values in (data.strata or {}).items():
        values = np.asarray(values)[test]
        table = {}
        for value in sorted(set(values.tolist()) - {""}):
            mask = values == value
            if mask.sum() < MIN_IMAGES:
                continue
            table[value] = _figures(labels[mask], probs[mask], None if groups is None else groups[mask],
                                    positive=positive, threshold=threshold, resamples=resamples, whole=whole)
        if table:
            out[attribute] = table
    return out


def _figures(labels, probs, groups, *, positive, threshold, resamples, whole) -> dict:
    said = decide(probs, positive, threshold) == positive
    figures = {"images": int(len(labels)), **rates(labels == positive, said)}
    both = len(np.unique(labels)) == probs.shape[1]
    if both:
        figures["auc"] = auc(labels, probs)
    ci = confidence_intervals(labels, probs, positive=positive, threshold=threshold, resamples=resamples,
                              groups=groups) if both else {}
    figures["ci"] = ci
    below = [name for name in ("auc", "sensitivity") if ci.get(name) and whole.get(name) is not None
             and ci[name][1] < whole[name]]
    figures["below_whole"] = below
    return figures


def strata_lines(strata: dict, whole: dict) -> list[str]:
    """The report's section: one table per attribute."""
    if not strata:
        return []
    lines = ["## Test figures by stratum", "",
             f"The test split broken down by what is recorded of each image (strata of at least {MIN_IMAGES} "
             f"images; intervals 95%, over patients where known). Whole test set: AUC {whole['auc']:.3f}, "
             f"sensitivity {_pct(whole.get('sensitivity'))}. **Below** marks a stratum whose interval lies wholly "
             f"below the whole set's figure: the model may serve it worse."]
    for attribute, table in strata.items():
        lines += ["", f"**{attribute}**", "", "| value | images | AUC (95% CI) | sensitivity (95% CI) | "
                                              "specificity (95% CI) | below |", "| --- | --- | --- | --- | --- | --- |"]
        for value, f in table.items():
            ci = f["ci"]
            lines.append(f"| {value} | {f['images']} | {_with_ci(f.get('auc'), ci.get('auc'), digits=3)} | "
                         f"{_with_ci(f.get('sensitivity'), ci.get('sensitivity'))} | "
                         f"{_with_ci(f.get('specificity'), ci.get('specificity'))} | "
                         f"{'**' + ', '.join(f['below_whole']) + '**' if f['below_whole'] else ''} |")
    return lines


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_ci(value, ci, *, digits: int = 3) -> str:
    if value is None:
        return "n/a (one class)"
    return f"{value:.{digits}f}" + (f" ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})" if ci else "")
