"""Audit a data set before any training: counts, duplicate files, and shortcuts.

A shortcut is a property of the files that nearly gives the label away without looking at the
lungs: in COVID-CT (UCSD) only COVID images are RGBA; a vendor's train/test split that shares
files leaks. The loader already converts every image to one mode, but the audit says what the
files carry, so that a suspiciously good score can be read for what it is.

Example:
    >>> data = load_dataset("../shared/data/covid-ct-ucsd/patients.csv", image_size=64)
    >>> report = audit_dataset(data)
    >>> report["warnings"]
    ['mode nearly gives the label away: RGBA is COVID in 174 of 174 images ...']
    >>> data = dedupe(data, report)      # drops train copies of files also in val or test
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np

from ingest.dataset import SPLITS, Dataset
from ingest.files import unread_line
from ingest.shortcuts import SHORTCUT_AUC, shortcut_probe

PURITY = 0.95        # a value this pure in one class ...
COVERAGE = 0.10      # ... and holding this share of that class's images is a shortcut
ACCURACY_GAIN = 0.20  # or: predicting the label from the property alone beats the majority class by this
RARE = 5             # property values with fewer images are pooled as "other"
LEFT_OUT = 255
FEW = 10             # fewer images than this of a class in a split: its metrics are mostly chance


def audit_dataset(data: Dataset) -> dict:
    """Counts per class and split, groups per split, exact duplicates (by content hash) within and
    across splits, and per class the distribution of file format, colour mode and size, with a
    warning for every property that nearly predicts the label. Plain JSON-able data."""
    files = _file_properties(data)
    used = np.flatnonzero(data.split != LEFT_OUT)
    report = {"source": data.source, "fingerprint": data.fingerprint, "split_kind": data.split_kind,
              "class_names": data.class_names, "images": int(len(used)), "counts": data.counts(), "warnings": [],
              "unread": dict(data.unread)}
    few = [f"{s} {c} ({n})" for s, per in report["counts"].items() for c, n in per.items() if n < FEW]
    if few:
        report["warnings"].append(f"FEW: fewer than {FEW} images of a class in a split: {', '.join(few)}; a metric "
                                  f"on so few images is mostly chance (its interval in the report says how wide)")
    if data.groups is not None:
        report["groups_per_split"] = {s: int(len(np.unique(data.groups[data.indices(s)]))) for s in SPLITS}
    report["duplicates"] = _duplicates(data, files["sha256"], used, report["warnings"])
    report["properties"] = {}
    for prop in ("format", "mode", "size"):
        if prop in files:
            report["properties"][prop] = _shortcut(prop, files[prop], data, used, report["warnings"])
    report["probe"] = probe = shortcut_probe(data, used)
    if probe["acquisition"]["shortcut"]:
        report["warnings"].append(
            f"SHORTCUT: properties of the files that cannot be the disease predict the label at AUC "
            f"{probe['acquisition']['auc']:.2f} (a logistic regression cross-validated by {probe['grouped_by']}; "
            f"strongest alone: {_strongest_line(probe['acquisition'])}). The classes may come from different "
            f"acquisitions (hospitals, scanners, exports), and a model can learn those instead of the disease: "
            f"test it on data from elsewhere, and look at the saliency maps in the report")
    return report


def _strongest_line(probe: dict) -> str:
    return ", ".join(f"{s['property']} {s['auc']:.2f}" for s in probe["strongest"]) or "none alone"


def probe_lines(report: dict) -> list[str]:
    """What the shortcut probe says, for the console, data_report.md and the final report."""
    probe = report.get("probe")
    if not probe:
        return []
    acquisition, image = probe["acquisition"], probe["image"]
    lines = []
    if acquisition["auc"] is not None:
        lines.append(f"Acquisition (properties that cannot be the disease: {', '.join(acquisition['features'])}) "
                     f"predicts the label at AUC {acquisition['auc']:.2f}, cross-validated by {probe['grouped_by']}"
                     + (f": **a shortcut** (>= {SHORTCUT_AUC}); strongest alone: {_strongest_line(acquisition)}."
                        if acquisition["shortcut"] else f" (below {SHORTCUT_AUC}: no shortcut found)."))
    else:
        lines.append("Acquisition: not probed (arrays, not files: one pipeline made every image).")
    if image["auc"] is not None:
        lines.append(f"The images' own statistics ({', '.join(image['features'])}) predict the label at AUC "
                     f"{image['auc']:.2f} (strongest alone: {_strongest_line(image)}): disease or acquisition "
                     f"(opacity brightens a lung; so does an exposure or a burnt-in label); look at the saliency "
                     f"maps.")
    return lines


def _file_properties(data: Dataset) -> dict[str, list]:
    """Per image: content hash, and for image files their format, mode and size (all read in the
    decoding pass: no file is opened again)."""
    if data.file_infos is None:  # arrays (npz): hash the decoded pixels, a block at a time
        block = 4096
        return {"sha256": [hashlib.sha256(im.tobytes()).hexdigest()[:32] for start in range(0, len(data.labels), block)
                           for im in data.images[start:start + block]]}
    return {k: [info[k] for info in data.file_infos] for k in ("sha256", "format", "mode", "size")}


def _duplicates(data: Dataset, digests: list[str], used: np.ndarray, warnings: list[str]) -> dict:
    used = used.tolist()
    repeated = {d for d, n in Counter(digests[i] for i in used).items() if n > 1}
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i in used:
        if digests[i] in repeated:
            by_digest[digests[i]].append(i)
    groups = list(by_digest.values())
    name = (lambda i: data.paths[i]) if data.paths is not None else (lambda i: f"#{i}")  # noqa: E731
    out = {"groups": [], "within_split": 0, "across_splits": 0, "conflicting_labels": 0}
    for members in groups:
        splits = sorted({SPLITS[data.split[i]] for i in members}, key=SPLITS.index)
        labels = sorted({data.class_names[data.labels[i]] for i in members})
        kind = "across_splits" if len(splits) > 1 else "within_split"
        out[kind] += 1
        out["conflicting_labels"] += len(labels) > 1
        out["groups"].append({"files": [name(i) for i in members], "splits": [SPLITS[data.split[i]] for i in members],
                              "labels": [data.class_names[data.labels[i]] for i in members], "kind": kind})
    across = [g for g in out["groups"] if g["kind"] == "across_splits"]
    if across:
        given = " given by the data set" if data.split_kind.startswith("given") else ""
        listed = "; ".join(" = ".join(f"{f} [{s}]" for f, s in zip(g["files"], g["splits"])) for g in across[:10])
        warnings.append(f"LEAK: {len(across)} file(s) appear in more than one split{given} (identical bytes): "
                        f"{listed}{' ...' if len(across) > 10 else ''}; a search keeps only the copy in the later split "
                        f"(unless told to keep duplicates)")
    conflicting = [g for g in out["groups"] if len(set(g["labels"])) > 1]
    if conflicting:
        warnings.append(f"{len(conflicting)} identical file(s) carry different labels: "
                        + "; ".join(" / ".join(f"{f} ({lab})" for f, lab in zip(g["files"], g["labels"]))
                                    for g in conflicting[:5]))
    return out


def _shortcut(prop: str, values: list[str], data: Dataset, used: np.ndarray, warnings: list[str]) -> dict:
    """Per class, how often each value of `prop` occurs; how well the value alone predicts the label."""
    values = [values[i] for i in used]
    labels = [data.class_names[data.labels[i]] for i in used]
    common = {v for v, n in Counter(values).items() if n >= RARE}
    pooled = [v if v in common else "other" for v in values]
    table: dict[str, Counter] = {}
    for (v, label), n in Counter(zip(pooled, labels)).items():
        table.setdefault(v, Counter())[label] = n
    class_totals = Counter(labels)
    accuracy = sum(max(c.values()) for c in table.values()) / len(labels)
    baseline = max(class_totals.values()) / len(labels)
    pure = []
    for v, counts in table.items():
        label, n = counts.most_common(1)[0]
        total = sum(counts.values())
        if v != "other" and n / total >= PURITY and n / class_totals[label] >= COVERAGE and total < len(labels):
            pure.append({"value": v, "class": label, "images": n, "of": total,
                         "share_of_class": round(n / class_totals[label], 3)})
    suspicious = bool(pure) or accuracy - baseline >= ACCURACY_GAIN
    if suspicious:
        detail = "; ".join(f"{p['value']} is {p['class']} in {p['images']} of {p['of']} images "
                           f"({p['share_of_class']:.0%} of {p['class']})" for p in pure)
        warnings.append(f"SHORTCUT: the file {prop} nearly gives the label away ({detail or 'by itself'}; it "
                        f"predicts the label with accuracy {accuracy:.2f} against {baseline:.2f} for the "
                        f"majority class). The loader converts every image to one mode and size, but images "
                        f"that differ this way may differ in other ways a model can learn (source, scanner)")
    by_class = {label: dict(Counter({v: counts[label] for v, counts in table.items() if counts[label]}).most_common(8))
                for label in data.class_names}
    return {"by_class": by_class, "predictive_accuracy": round(accuracy, 4), "majority_baseline": round(baseline, 4),
            "pure_values": pure, "shortcut": suspicious}


def dedupe(data: Dataset, report: dict) -> tuple[Dataset, list[str]]:
    """Drop from train (and from val) every file whose identical copy is in a later split (val or
    test); returns the data set and the dropped files, which the caller reports."""
    split = data.split.copy()
    index = {p: i for i, p in enumerate(data.paths)} if data.paths is not None else None
    dropped = []
    for group in report["duplicates"]["groups"]:
        if group["kind"] != "across_splits":
            continue
        last = max(SPLITS.index(s) for s in group["splits"])
        for f, s in zip(group["files"], group["splits"]):
            if SPLITS.index(s) < last:
                split[index[f] if index is not None else int(f[1:])] = LEFT_OUT
                dropped.append(f"{f} [{s}]")
    return replace(data, split=split), dropped


def summary_lines(report: dict) -> list[str]:
    """The short console summary."""
    counts = " | ".join(f"{s}: " + ", ".join(f"{c} {n}" for c, n in per.items()) for s, per in report["counts"].items())
    dup = report["duplicates"]
    lines = [f"data audit: {report['images']} images | {counts}",
             f"  duplicates: {dup['within_split']} group(s) within a split, {dup['across_splits']} across splits, "
             f"{dup['conflicting_labels']} with conflicting labels"]
    if "groups_per_split" in report:
        lines.append("  groups per split: " + ", ".join(f"{s} {n}" for s, n in report["groups_per_split"].items()))
    if report.get("unread"):
        lines.append(f"  left unread: {unread_line(report['unread'])}")
    lines += [f"  shortcut probe: {line.replace('**', '')}" for line in probe_lines(report)]
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return lines


def render(report: dict) -> str:
    """`data_report.md`: the report as tables."""
    names = report["class_names"]
    lines = [f"# Data audit: {report['source']}", "",
             f"{report['images']} images, split {report['split_kind']}, fingerprint `{report['fingerprint']}`.", ""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    unread = report.get("unread") or {}
    lines += ["## Files not read", "", (f"{sum(unread.values())} file(s) under the data were not read as images: "
                                         + unread_line(unread) + ".") if unread else "Every file under the data was read.", ""]
    lines += ["## Images per class and split", "", "| split | " + " | ".join(names) + " | groups |",
              "| --- |" + " --- |" * (len(names) + 1)]
    for s, per in report["counts"].items():
        groups = report.get("groups_per_split", {}).get(s, "")
        lines.append(f"| {s} | " + " | ".join(str(per[n]) for n in names) + f" | {groups} |")
    if report.get("preview"):
        lines += ["", "## What the trials see", "", "A few training images per class, decoded as the trials receive "
                  "them (windowed, inverted where the file says, resized; before augmentation): "
                  f"`{report['preview']}`.", "", f"![training images per class]({report['preview']})"]
    dup = report["duplicates"]
    lines += ["", "## Exact duplicates (identical file bytes)", "",
              f"{dup['within_split']} group(s) within a split, {dup['across_splits']} across splits, "
              f"{dup['conflicting_labels']} with conflicting labels.", ""]
    if dup["groups"]:
        lines += ["| kind | files (split/file, label) |", "| --- | --- |"]
        for g in dup["groups"]:
            lines.append(f"| {g['kind']} | " + "<br>".join(f"{f} [{s}] ({lab})" for f, s, lab in
                                                           zip(g["files"], g["splits"], g["labels"])) + " |")
    if report.get("probe"):
        lines += ["", "## Shortcut probe", ""] + [f"- {line}" for line in probe_lines(report)]
    for prop, stats in report["properties"].items():
        lines += ["", f"## File {prop} per class", "",
                  f"Predicting the label from the {prop} alone: accuracy {stats['predictive_accuracy']:.2f} "
                  f"(majority class: {stats['majority_baseline']:.2f})"
                  + (" - **a shortcut**." if stats["shortcut"] else "."), ""]
        values = sorted({v for per in stats["by_class"].values() for v in per})
        lines += ["| class | " + " | ".join(values) + " |", "| --- |" + " --- |" * len(values)]
        for label, per in stats["by_class"].items():
            lines.append(f"| {label} | " + " | ".join(str(per.get(v, 0)) for v in values) + " |")
    return "\n".join(lines) + "\n"
