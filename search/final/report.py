"""`final/report.md`: the read-out for someone who did not run the search, one function per section.
`SECTIONS` lists them in order; a section that shows something finalize computes for it (a figure,
saliency maps, the external read-out, importances) names the function that computes it
(`search.final.readouts`), whose result goes into `metrics.json` under the section's key before the
report is written. A new section is one entry there, and nothing in the pipeline changes.

Example:
    >>> summary.update(computed(finalized))      # a search.final.readouts.Finalized: figures written
    >>> text = render_report(folder, summary, models, board, siblings=[])
    >>> text.splitlines()[0]
    '# Final report: backbones-20261123-0100'
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.formatting import figure, interval
from ingest.leakage import probe_lines
from search.final.external import external_lines
from search.final.readouts import (Finalized, Scored, confusion, external_readout, importance_of_search, reliability, roc_curves,
                                   saliency_maps, search_curves)
from search.final.strata import strata_lines

KEY_PARAMS = ("lr", "head_lr_ratio", "optimizer", "weight_decay", "schedule", "dropout", "freeze_depth",
              "class_weights", "minority_weight", "augment", "head")


@dataclass
class Read(Scored):
    """What the report is written from: the scored final models, and `siblings`, the final models of
    other searches on the same data."""

    siblings: list[dict]


@dataclass(frozen=True)
class Section:
    """A part of the report: `render(read)` gives its lines (none: left out); with `compute`, what it
    shows is computed once by `compute(finalized)` (its figures written) and, with `key`, kept in
    metrics.json under it."""

    render: Callable[[Read], list[str]]
    key: str | None = None
    compute: Callable[[Finalized], object] | None = None


SECTIONS = (
    Section(lambda r: _headline(r.folder, r.summary, r.models)),
    Section(lambda r: _models_table(r.summary, r.models, r.metric)),
    Section(lambda r: _siblings(r.siblings)),
    Section(lambda r: ["![ROC curves](roc.png)"], compute=roc_curves),
    Section(lambda r: _per_class(r.summary["chosen"], r.chosen["test"])),
    Section(lambda r: _confusion(r.chosen["test"]), compute=confusion),
    Section(lambda r: strata_lines(r.summary.get("strata") or {}, r.chosen["test"])),
    Section(lambda r: external_lines(r.summary.get("external") or [], _internal(r.chosen), plot="external_roc.png"),
            key="external", compute=external_readout),
    Section(lambda r: _calibration(r.summary, r.models), compute=reliability),
    Section(lambda r: _members(r.models, r.metric, r.summary.get("failed_members", []))),
    Section(lambda r: _search(r.summary, r.board, r.metric), compute=search_curves),
    Section(lambda r: _importance(r.summary.get("importance")), key="importance", compute=importance_of_search),
    Section(lambda r: _data(r.summary["data"], r.summary.get("audit"))),
    Section(lambda r: _saliency(r.summary.get("saliency") or {}, r.summary.get("audit") or {}), key="saliency",
            compute=saliency_maps),
    Section(lambda r: _method(r.summary)),
    Section(lambda r: _use(r.folder, r.summary["versions"])),
)


def computed(finalized: Finalized) -> dict:
    """What the sections show beyond the scored models, by key; their figures written into `finalized.tmp`."""
    found = {s.key: s.compute(finalized) for s in SECTIONS if s.compute is not None and s.key}
    for s in SECTIONS:
        if s.compute is not None and not s.key:
            s.compute(finalized)
    return found


def render_report(folder: Path, summary: dict, models: dict, board: pd.DataFrame, siblings: list[dict]) -> str:
    """The whole report, section by section."""
    read = Read(folder, summary, models, board, siblings)
    return "\n\n".join("\n".join(lines) for lines in (s.render(read) for s in SECTIONS) if lines) + "\n"


def _headline(folder: Path, summary: dict, models: dict) -> list[str]:
    chosen, pos = summary["chosen"], summary["positive_class"]
    c = models[chosen]["test"]
    n_test = sum(summary["data"]["counts"]["test"].values())
    return [f"# Final report: {folder.name}", "",
            f"**Final model: {chosen}.** On the held-out test split ({n_test} images, never seen by the search "
            f"or by any choice made here) it reaches **AUC {c['auc']:.3f}** (95% CI {interval(c['ci']['auc'])}), "
            f"**accuracy {c['accuracy']:.3f}**, and for **{pos}** at the threshold chosen on the "
            f"{_where(summary)} ({c['threshold']:.3f} on p({pos}), Youden's J): **sensitivity "
            f"{figure(c['sensitivity'])}** ({interval(c['ci']['sensitivity'])}), **specificity {figure(c['specificity'])}** "
            f"({interval(c['ci']['specificity'])}), PPV {figure(c['ppv'])} ({interval(c['ci']['ppv'])}), NPV {figure(c['npv'])} "
            f"({interval(c['ci']['npv'])}).", "",
            f"Balanced accuracy {c['balanced_accuracy']:.3f}; precision-recall AUC for {pos} {c['pr_auc']:.3f} (chance "
            f"{c['pr_auc_chance']:.3f}, the share of {pos} images)." + _majority(c), "",
            f"Why this model: {summary['choice']}."]


def _majority(c: dict) -> str:
    base = c["majority_baseline"]
    if c["accuracy"] > base["accuracy"]:
        return f" Calling every image {base['class']} would score accuracy {base['accuracy']:.3f}."
    return (f" **Accuracy is no better than calling every image {base['class']} ({base['accuracy']:.3f})**: with "
            f"classes this unequal, read balanced accuracy, sensitivity and the precision-recall AUC instead.")


def _models_table(summary: dict, models: dict, metric: str) -> list[str]:
    opts, k = summary["finalize_options"], summary["selection"]["folds"]
    members = sum(m["kind"] == "member" for m in models.values())
    trained = (f"as {k} fold models, each on {k - 1} folds of train+val (a member averages them)" if k > 1
               else "on train+val" if opts["refit_on_val"] else "on train")
    lines = ["## Models on the test split", "",
             f"Members are the {members} best distinct configurations of the search, each trained {trained}, "
             f"{opts['seeds']} seed(s); the first seed goes on from its trial's checkpoint, the same run, "
             f"where the trial's config and data are unchanged"
             + ("" if opts.get("warm_restart", "none") == "none" else
                f", then {'the best configuration' if opts['warm_restart'] == 'best' else 'each member'} trains its "
                f"schedule once more from half its learning rate (a warm restart; the epochs column says which)")
             + f"; `ensemble-mean` averages their probabilities, `ensemble-fitted` weights "
             f"them by greedy ensemble selection on the {_where(summary)}. Each model's threshold is its own, "
             f"chosen there.", "",
             f"| model | {'OOF' if k > 1 else 'val'} {metric[4:]} | test AUC (95% CI) | accuracy | sensitivity (95% CI) | "
             f"specificity (95% CI) | PPV | NPV | threshold |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in models.items():
        t = m["test"]
        shown = f"**{name}** (final)" if name == summary["chosen"] else name
        lines.append(f"| {shown} | {m['val'][metric[4:]]:.4f} | {t['auc']:.4f} ({interval(t['ci']['auc'])}) | "
                     f"{t['accuracy']:.3f} | {figure(t['sensitivity'])} ({interval(t['ci']['sensitivity'])}) | "
                     f"{figure(t['specificity'])} ({interval(t['ci']['specificity'])}) | {figure(t['ppv'])} | "
                     f"{figure(t['npv'])} | {t['threshold']:.3f} |")
    return lines


def _siblings(siblings: list[dict]) -> list[str]:
    if not siblings:
        return []
    lines = ["Other finalized searches on the same data (same fingerprint), their final models:", "",
             "| experiment | space | model | test AUC (95% CI) | accuracy | sensitivity | specificity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in siblings:
        t = s["test"]
        lines.append(f"| {s['experiment']} | {s['space']} | {s['model']} | {t['auc']:.4f} ({interval(t['ci']['auc'])}) | "
                     f"{t['accuracy']:.3f} | {figure(t['sensitivity'])} | {figure(t['specificity'])} |")
    return lines


def _per_class(chosen: str, c: dict) -> list[str]:
    lines = [f"## {chosen}: per class", "",
             "| class | precision | recall | F1 | AUC (vs rest) | PR AUC (vs rest) | images |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in c["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['auc']:.4f} | "
                     f"{row['pr_auc']:.4f} | {row['support']} |")
    for kind, auc in (("macro", f"{c['auc']:.4f}"), ("weighted", "")):
        a = c[f"{kind}_avg"]
        lines.append(f"| *{kind} average* | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | {auc} |  |  |")
    return lines


def _confusion(c: dict) -> list[str]:
    names = list(c["per_class"])
    lines = ["Confusion matrix (rows: true class, columns: predicted at the threshold):", "",
             "| true \\ predicted | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(names, c["confusion_matrix"])]
    return lines + ["", f"Accuracy when each image simply gets its most probable class: {c['accuracy_argmax']:.3f}.",
                    "", "![confusion matrix](confusion_matrix.png)"]


def _internal(model: dict) -> dict:
    """The chosen model's internal test figures with its calibration, as the external table shows them."""
    return {**model["test"], "calibration": model.get("calibration")}


def _calibration(summary: dict, models: dict) -> list[str]:
    chosen = summary["chosen"]
    final = models[chosen]["calibration"]
    gain, fitted = final["selection_log_loss_gain"], final["fitted_temperature"]
    where = _where(summary)
    if final["temperature"] != 1:
        applied = (f"its logits are divided by T = {final['temperature']:.3f}, fitted by log loss on the {where} "
                   f"(T > 1 softens overconfident probabilities); fitted on 4 of 5 folds of them at a time, it lowers the "
                   f"log loss of the fifth by {gain['difference']:.4f} (95% CI {gain['ci'][0]:.4f} to "
                   f"{gain['ci'][1]:.4f})")
    elif final["fitted_at_range_end"]:
        low, high = final["temperature_range"]
        applied = (f"the temperature fitted on the {where}, T = {fitted:.3f}, is at an end of the range searched "
                   f"({low} to {high}): their log loss has no minimum inside it (at the low end: they are all "
                   f"classified right, so sharper always looks better), which says nothing about new images, "
                   f"so T stays 1")
    else:
        applied = (f"the temperature fitted on the {where}, T = {fitted:.3f}, fitted on 4 of 5 folds of them at a "
                   f"time, would lower the log loss of the fifth by only {gain['difference']:.4f} (95% CI "
                   f"{gain['ci'][0]:.4f} to {gain['ci'][1]:.4f}), within noise, so T stays 1")
    lines = ["## Calibration", "",
             f"A probability of 0.9 should be right nine times in ten. Temperature scaling of the final model: "
             f"{applied}. Its threshold was chosen on the calibrated scores, and `search.predict` gives the calibrated "
             f"probabilities. Test figures: expected calibration error (ECE, top-label confidence in 10 equal bins), "
             f"Brier score, log loss; lower is better.",
             "", "| model | ECE | Brier | log loss |", "| --- | --- | --- | --- |"]
    for name, m in models.items():
        c = m["calibration"]
        if name == chosen:
            b = c["before"]
            lines.append(f"| {name}, as trained | {b['ece']:.4f} | {b['brier']:.4f} | {b['log_loss']:.4f} |")
            lines.append(f"| **{name}** (final, T = {c['temperature']:.3f}) | {c['ece']:.4f} | {c['brier']:.4f} | "
                         f"{c['log_loss']:.4f} |")
        else:
            lines.append(f"| {name} | {c['ece']:.4f} | {c['brier']:.4f} | {c['log_loss']:.4f} |")
    return lines + ["", "![calibration](calibration.png)"]


def _first_seed(member: dict) -> str:
    start = member.get("from_trial_epoch", 0)
    return ("retrained" if not start else f"its trial's network (epoch {start})" if start == member["epochs"]
            else f"its trial's epoch {start}, trained on to {member['epochs']}")


def _members(models: dict, metric: str, failed: list[dict]) -> list[str]:
    lines = ["## Members", ""]
    if failed:
        lines += ["**Retraining failed** for " + "; ".join(f"{f['name']} ({f['error']})" for f in failed)
                  + ": each was skipped and the next distinct configuration of the leaderboard took its place.", ""]
    lines += [f"| member | trial | search val {metric[4:]} | final val {metric[4:]} | epochs | seeds | first seed | "
              f"test AUC per seed | " + " | ".join(KEY_PARAMS) + " |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(KEY_PARAMS)]
    for name, m in models.items():
        if m["kind"] == "member":
            params = " | ".join(_param(m["config"].get(k)) for k in KEY_PARAMS)
            lines.append(f"| {name} | {m['trial_id']} | {m['search'][metric]:.4f} | {m['val'][metric[4:]]:.4f} | "
                         f"{m['epochs']}{f' + {r} (warm restart)' if (r := m.get('warm_restart_epochs')) else ''} | "
                         f"{len(m['seeds'])} | "
                         f"{_first_seed(m)} | "
                         f"{', '.join(f'{a:.4f}' for a in m['test_auc_per_seed'])} | {params} |")
    for name, m in models.items():
        if m["kind"] == "ensemble":
            lines += ["", f"`{name}` weights: " + ", ".join(f"{n} {w:.2f}" for n, w in m["weights"].items())]
    return lines


def _search(summary: dict, board: pd.DataFrame, metric: str) -> list[str]:
    stopped = int(board["stopped_early"].sum()) if "stopped_early" in board else 0
    failed = int((board["status"] == "ERROR").sum())
    return ["## The search", "",
            f"Space `{summary['search']['space']}`, {len(board)} trials ({stopped} stopped early by ASHA, {failed} "
            f"failed), optimising validation {metric}; the leaderboard is `../leaderboard.csv`."
            + _warm_start(summary.get("warm_start")) + _stop_rule(summary.get("stop_rule")), "",
            "![search progress](search_progress.png)", "", "![training curves](training_curves.png)"]


def _stop_rule(stop: dict | None) -> str:
    if not stop or not stop.get("stopped"):
        return " It ran its whole budget." if stop and stop.get("on") else ""
    unspent = stop.get("budget_unspent_seconds")
    return (f" The stop rule ended it after {stop['trials_run']} trials ({stop['trials_unspent']} of its trials"
            + (f" and {unspent:.0f} s of its time budget" if unspent is not None else "") + " unspent): "
            f"{stop['reason']}; `--no-stop-rule` runs the whole budget.")


def _warm_start(warm: dict | None) -> str:
    if not warm or not warm.get("from"):
        return ""
    sources = "; ".join(f"`{w['experiment']}` ({w['given']} of its {w['trials']} trials, "
                        f"{'the same data' if w['same_data'] else 'other data'})" for w in warm["from"])
    return (f" It started from earlier searches (`--warm-start`): {sources}; backbones not swept again: "
            f"{', '.join(warm['skipped_backbones']) or 'none'}.")


def _warm(found: dict) -> str:
    return f" and the {found['warm']} of a warm start" if found.get("warm") else ""


def _importance(found: dict | None) -> list[str]:
    if not found:
        return ["What mattered: no study was kept, so no hyperparameter importances."]
    if not found["values"]:
        return [f"What mattered: too few trials to tell. {found['trials']} trial(s) with parameters the sampler "
                f"chose ran to the end (the {found['fixed']} first trials at fixed values{_warm(found)} are left "
                f"out); hyperparameter importances need at least {found['minimum']}, with two or more parameters in "
                f"common. A longer budget, or `--warm-start` from earlier searches, gives the sampler more."]
    lines = ["### What mattered in the search", "",
             f"Each hyperparameter's share of the variance of the scores of the {found['trials']} trials whose "
             f"parameters the sampler chose and that ran to the end (fANOVA, over the parameters all of them "
             f"have; `optuna.importance`; the {found['fixed']} first trials at fixed values{_warm(found)} are left "
             f"out):", "",
             "| hyperparameter | importance |", "| --- | --- |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in found["values"].items()]
    return lines + ["", "![importance](importance.png)"]


def _saliency(shown: dict, audit: dict) -> list[str]:
    lines = ["## What the model looks at", "",
             "Grad-CAM of the final model (each network's last feature stage, combined by the ensemble weights) "
             "on the test images it was most sure of for each class, right and wrong. Warm colours mark what "
             "drove the call: it should lie on the lungs, not on a text marker, a device, a border or the "
             "background, which would be a shortcut like the ones the audit above looks for."]
    probe = probe_lines(audit)
    if probe:
        lines += ["", "The data audit's shortcut probe (`../data_report.md`):", ""] + [f"- {line}" for line in probe]
    for name, entry in shown.items():
        lines += ["", f"**{name}**: {len(entry['most_confident_correct'])} most confident correct, "
                      f"{len(entry['most_confident_errors'])} most confident errors (test indices "
                      f"{entry['most_confident_correct'] + entry['most_confident_errors']}).", "",
                  f"![saliency {name}]({entry['file']})"]
    return lines


def _data(data: dict, audit: dict | None) -> list[str]:
    h, w, c = data["image_shape"]
    lines = ["## Data", "",
             f"`{data['source']}`, split {data['split_kind']}, fingerprint `{data['fingerprint']}`, images {h}x{w}x{c}.",
             "", "| split | " + " | ".join(data["class_names"]) + " |", "| --- |" + " --- |" * len(data["class_names"])]
    for split, counts in data["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts[n]) for n in data["class_names"]) + " |")
    return lines + [""] + _audit(audit or {})


def _audit(audit: dict) -> list[str]:
    """Every warning of the data audit, each with what was done about it."""
    if not audit.get("warnings"):
        return ["The data audit raised no warning (`../data_report.md` has its tables)."]
    lines = ["**The data audit warned** (`../data_report.md` has the tables):", ""]
    for warning in audit["warnings"]:
        if warning.startswith("LEAK"):
            done = (f"the {len(audit.get('deduped') or [])} copies in the earlier split were dropped before training "
                    f"(named in the data report)" if audit.get("dedupe") else
                    "kept: the search ran with --no-dedupe, so the test figures may be optimistic")
        elif warning.startswith("SHORTCUT"):
            done = ("every image was converted to one mode and size, so the model never sees this property; but "
                    "images that differ this way may differ in what a model can learn instead of the lungs: check "
                    "the saliency maps below")
        else:
            done = "nothing was changed: check these files"
        lines.append(f"- {warning}\n  *Done:* {done}.")
    return lines


def _method(summary: dict) -> list[str]:
    where, resamples = _where(summary), summary["finalize_options"]["bootstrap"]
    patients = "groups_per_split" in summary["data"]
    unit = "patients (each with all its images)" if patients else "images"
    return ["## Method", "",
            f"- Selection: {summary['selection']['mode']}. The test split took no part in the search, the "
            f"retraining, the choice of threshold, ensemble weights or final model: all of those used the {where} "
            f"({summary['selection']['images']} images).",
            f"- Threshold: the point of the ROC curve of the positive class (against all others) on the {where} "
            "that maximises Youden's J = sensitivity + specificity - 1; an image is called positive when its "
            "probability reaches it, otherwise it gets the most probable other class.",
            f"- 95% intervals: AUC, the percentile interval over {resamples} bootstrap resamples of the test "
            f"{unit}, stratified by class; sensitivity, specificity, PPV and NPV, Wilson score intervals"
            + (", counting patients rather than images" if patients else "") + ".",
            f"- Ensemble weights: greedy ensemble selection with replacement (Caruana et al., 2004) on the {where}; "
            "the ensemble is final only when it beats the best single member there (search metric, then log "
            f"loss). The margin's interval comes from the same stratified bootstrap, over the {where}, both "
            "models scored on each resample."]


def _where(summary: dict) -> str:
    return summary["selection"]["where"]


def _use(folder: Path, versions: dict) -> list[str]:
    shown = ("python", "torch", "timm", "ray", "optuna", "scikit-learn")
    return ["## Use it", "", "```bash",
            f"python -m search.predict --model {folder}/final/ensemble --images path/to/images --out predictions.csv",
            "```", "",
            "Files: `metrics.json` (everything above), `test_predictions.csv` / `val_predictions.csv` (the final "
            "model's probabilities per image), `ensemble/` (the final model), `members/` (each member alone).", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k in shown)]


def _param(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
