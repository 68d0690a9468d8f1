"""The outputs of finalize: members and ensembles evaluated, the final model chosen on validation,
and `<experiment>/final/` written (metrics.json, predictions, report.md, plots, model directories).

Example:
    >>> final = write_final(folder, options=options, record=record, board=board, data=data,
    ...                     members=members, positive=1, metric="val_auc", mode="max")
    >>> json.loads((final / "metrics.json").read_text())["chosen"]
    'ensemble-fitted'
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from search.evaluate import evaluate, youden_threshold
from search.finalize import ensemble_weights, validation_key
from search.leaderboard import plot_progress
from search.predict import save_model

KEY_PARAMS = ("lr", "head_lr_ratio", "optimizer", "weight_decay", "schedule", "dropout", "freeze_depth",
              "class_weights", "minority_weight", "augment", "head")


def write_final(folder: Path, *, options, record: dict, board: pd.DataFrame, data, members: list[dict],
                positive: int, metric: str, mode: str) -> Path:
    """Evaluate every member and ensemble, choose the final model, write `folder/final/`."""
    from search.run import _versions
    val_x, val_y = data.arrays("val")
    test_y = data.arrays("test")[1]
    names = data.class_names
    models = {}
    for member in members:
        runs = member["runs"]
        models[member["name"]] = _scored(
            {"kind": "member", "trial_id": member["trial_id"], "config": member["config"], "epochs": member["epochs"],
             "seeds": [r["seed"] for r in runs], "search": member["search"],
             "test_auc_per_seed": [_auc(test_y, r["test"]) for r in runs]},
            np.mean([r["val"] for r in runs], 0), np.mean([r["test"] for r in runs], 0),
            val_y, test_y, names, positive, metric, options)
    member_names = list(models)
    if len(members) > 1:
        fitted = ensemble_weights([models[n]["val_probs"] for n in member_names], val_y, metric)
        for kind, weights in (("mean", np.full(len(members), 1 / len(members))), ("fitted", fitted)):
            models[f"ensemble-{kind}"] = _scored(
                {"kind": "ensemble", "weighting": kind, "weights": dict(zip(member_names, weights.tolist()))},
                sum(w * models[n]["val_probs"] for w, n in zip(weights, member_names)),
                sum(w * models[n]["test_probs"] for w, n in zip(weights, member_names)),
                val_y, test_y, names, positive, metric, options)
    chosen, choice, margin = _choose(models, member_names, val_y, metric, resamples=options.bootstrap)

    final = folder / "final"
    tmp = folder / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    summary = {"experiment": folder.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "finalize_options": asdict(options), "search": {k: record.get(k) for k in ("space", "profile", "options")},
               "data": data.summary(), "versions": _versions(), "positive_class": names[positive],
               "chosen": chosen, "choice": choice, "choice_margin": margin,
               "models": {n: {k: v for k, v in m.items() if not k.endswith("_probs")} for n, m in models.items()}}
    (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, default=_plain))
    for split, labels in (("val", val_y), ("test", test_y)):
        _predictions(data, split, labels, models[chosen], names).to_csv(tmp / f"{split}_predictions.csv", index=False)

    model_record = {"class_names": names, "positive_class": names[positive],
                    "preprocessing": {"image_size": int(data.images.shape[1]), "channels": int(data.channels),
                                      "decode": "trainables.data.decode_image"},
                    "data": data.summary(), "versions": _versions(), "experiment": str(folder)}
    by_name = {m["name"]: m for m in members}
    for name in member_names:
        save_model(tmp / "members" / name, {**model_record, "kind": "single", "name": name,
                                            "threshold": models[name]["val"]["threshold"]},
                   [_saved_member(by_name[name], 1.0)])
    weights = models[chosen]["weights"] if chosen.startswith("ensemble") else {chosen: 1.0}
    save_model(tmp / "ensemble", {**model_record, "kind": "ensemble" if len(weights) > 1 else "single",
                                  "name": chosen, "threshold": models[chosen]["val"]["threshold"]},
               [_saved_member(by_name[n], w) for n, w in weights.items() if w > 0])

    plot_roc(models, chosen, test_y, names, positive, tmp / "roc.png")
    plot_confusion(models[chosen]["test"]["confusion_matrix"], names, chosen, tmp / "confusion_matrix.png")
    plot_training_curves(folder, board, members, metric, tmp / "training_curves.png")
    plot_progress(board, tmp / "search_progress.png", metric=metric, mode=mode, name=folder.name)
    (tmp / "report.md").write_text(render_report(folder, summary, models, board, metric, _siblings(folder, summary)))

    if final.exists():
        kept = folder / f"final-{time.strftime('%Y%m%d-%H%M%S', time.localtime(final.stat().st_mtime))}"
        final.rename(kept)
        print(f"the previous final/ is kept as {kept.name}/")
    tmp.rename(final)
    _print_summary(final, summary)
    return final


def _scored(entry: dict, val_probs, test_probs, val_y, test_y, names, positive, metric, options) -> dict:
    from search.evaluate import score
    threshold = youden_threshold(val_y == positive, val_probs[:, positive])
    val = {m: score(val_y, val_probs, f"val_{m}") for m in ("auc", "acc", "f1", "loss")}
    val["threshold"] = threshold
    test = evaluate(test_y, test_probs, names, positive=positive, threshold=threshold,
                    resamples=options.bootstrap, seed=0)
    return {**entry, "val": val, "test": test, "val_probs": val_probs, "test_probs": test_probs}


def _auc(labels, probs) -> float:
    from search.evaluate import auc
    return auc(labels, probs)


def _choose(models: dict, member_names: list[str], val_y, metric: str, *,
            resamples: int) -> tuple[str, str, dict | None]:
    """The best ensemble weighting on validation, kept only when it beats the best single member
    there; plus the validation margin over the runner-up, with its bootstrap interval."""
    from search.evaluate import paired_difference
    key = {n: validation_key(val_y, m["val_probs"], metric) for n, m in models.items()}
    best_member = max(member_names, key=lambda n: key[n])
    ensembles = [n for n in models if n.startswith("ensemble")]
    if not ensembles:
        return best_member, "one configuration was retrained: it is the final model", None
    best_ensemble = max(ensembles, key=lambda n: key[n])  # max keeps the first (mean) on a tie
    shown = lambda n: f"{metric} {models[n]['val'][metric[4:]]:.4f}, log loss {models[n]['val']['loss']:.4f}"  # noqa: E731
    if key[best_ensemble] > key[best_member]:
        chosen, runner_up = best_ensemble, best_member
        choice = (f"{best_ensemble} ({shown(best_ensemble)}) beats the best single model "
                  f"{best_member} ({shown(best_member)}) on validation")
    else:
        chosen, runner_up = best_member, best_ensemble
        choice = (f"the best single model {best_member} ({shown(best_member)}) is at least as good on "
                  f"validation as the best ensemble {best_ensemble} ({shown(best_ensemble)}), so it is "
                  f"the final model and final/ensemble holds it alone")
    margin = {"metric": metric, "versus": runner_up, **paired_difference(
        val_y, models[chosen]["val_probs"], models[runner_up]["val_probs"], metric, resamples=resamples)}
    lo, hi = margin["ci"]
    choice += (f"; {metric} difference {margin['difference']:+.4f} (95% CI {lo:+.4f} to {hi:+.4f} over "
               f"validation resamples)")
    if lo <= 0 <= hi:
        choice += (f", within validation noise: this validation split cannot tell {chosen} and {runner_up} "
                   f"apart (both are in the table below)")
    return chosen, choice, margin


def _saved_member(member: dict, weight: float) -> dict:
    return {"name": member["name"], "trial_id": member["trial_id"], "config": member["config"],
            "weight": float(weight), "states": [r["state"] for r in member["runs"]]}


def _predictions(data, split: str, labels, model: dict, names: list[str]) -> pd.DataFrame:
    from search.evaluate import decide
    probs = model[f"{split}_probs"]
    idx = data.indices(split)
    table = pd.DataFrame({"index": np.arange(len(idx))})
    if data.paths is not None:
        table["path"] = [data.paths[i] for i in idx]
    table["label"] = [names[k] for k in labels]
    for c, name in enumerate(names):
        table[f"p_{name}"] = probs[:, c]
    threshold = model["val"]["threshold"]
    table["predicted"] = [names[k] for k in decide(probs, names.index(model["test"]["positive_class"]), threshold)]
    return table


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _siblings(folder: Path, summary: dict) -> list[dict]:
    """The chosen models of other finalized searches on the same data (e.g. `--space recipes`)."""
    rows = []
    for other in sorted(folder.parent.iterdir()):
        path = other / "final" / "metrics.json"
        if other == folder or not path.is_file():
            continue
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            continue
        if theirs.get("data", {}).get("fingerprint") != summary["data"]["fingerprint"]:
            continue
        chosen = theirs["models"][theirs["chosen"]]
        rows.append({"experiment": other.name, "space": theirs["search"].get("space"), "model": theirs["chosen"],
                     "val": chosen["val"], "test": chosen["test"]})
    return rows


def _print_summary(final: Path, summary: dict) -> None:
    print(f"\nfinal: {final}")
    for name, m in summary["models"].items():
        t = m["test"]
        mark = "*" if name == summary["chosen"] else " "
        print(f" {mark} {name:40s} test AUC {t['auc']:.4f} [{t['ci']['auc'][0]:.3f}, {t['ci']['auc'][1]:.3f}]  "
              f"acc {t['accuracy']:.3f}  sens {_f(t['sensitivity'])}  spec {_f(t['specificity'])}  "
              f"(validation {summary['search']['options']['metric'][4:]} "
              f"{m['val'][summary['search']['options']['metric'][4:]]:.4f})")
    print(f"chosen: {summary['chosen']}: {summary['choice']}")
    print(f"report: {final / 'report.md'}; model: {final / 'ensemble'}")


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---- plots ------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_roc(models: dict, chosen: str, test_y, names, positive: int, path: Path) -> None:
    """Left: the positive class against the rest for every model, each operating point marked.
    Right (3+ classes): the chosen model's one-vs-rest curve per class."""
    from sklearn.metrics import roc_curve
    plt = _pyplot()
    panels = 2 if len(names) > 2 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 6), squeeze=False)
    ax = axes[0, 0]
    for name, m in models.items():
        fpr, tpr, _ = roc_curve(test_y == positive, m["test_probs"][:, positive])
        strong = name == chosen or m["kind"] == "ensemble"
        label = f"{name}{' (chosen)' if name == chosen else ''}: AUC {m['test']['per_class'][names[positive]]['auc']:.3f}"
        line, = ax.plot(fpr, tpr, lw=2.2 if name == chosen else (1.6 if strong else 1), ls="-" if strong else "--",
                        label=label)
        t = m["test"]
        if t["sensitivity"] is not None and t["specificity"] is not None:
            ax.plot(1 - t["specificity"], t["sensitivity"], "o", color=line.get_color(), ms=6 if name == chosen else 4)
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title=f"test ROC: {names[positive]} vs rest (dots: validation-chosen thresholds)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[0, 1]
        for c, name in enumerate(names):
            fpr, tpr, _ = roc_curve(test_y == c, models[chosen]["test_probs"][:, c])
            ax.plot(fpr, tpr, label=f"{name}: AUC {models[chosen]['test']['per_class'][name]['auc']:.3f}")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{chosen}: each class vs rest")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], names: list[str], title: str, path: Path) -> None:
    """Counts, with each row's share (the per-class recall on the diagonal)."""
    plt = _pyplot()
    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 1.4 * len(names) + 2.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=11)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted (at the validation-chosen threshold)", ylabel="true", title=f"test confusion matrix: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(folder: Path, board: pd.DataFrame, members: list[dict], metric: str, path: Path) -> None:
    """Validation metric and train loss per epoch: the top trials of the search (solid) and the
    retrained members (dashed, first seed)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    retrained = {m["trial_id"]: m for m in members}
    top = list(dict.fromkeys([*retrained, *board.dropna(subset=[metric])["trial_id"].head(6)]))[:6]
    for trial_id in top:
        progress = folder / f"trial_{trial_id}" / "progress.csv"
        if not progress.is_file():
            continue
        frame = pd.read_csv(progress)
        row = board[board["trial_id"] == trial_id].iloc[0]
        label = f"{trial_id} {row.get('recipe') if isinstance(row.get('recipe'), str) else row.get('backbone')}"
        line, = left.plot(frame["training_iteration"], frame[metric], marker="o", ms=3, label=label)
        right.plot(frame["training_iteration"], frame["train_loss"], marker="o", ms=3, color=line.get_color())
        if trial_id in retrained:
            history = pd.DataFrame(retrained[trial_id]["runs"][0]["history"])
            left.plot(history["epoch"], history[metric], ls="--", color=line.get_color())
            right.plot(history["epoch"], history["train_loss"], ls="--", color=line.get_color())
    left.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (dashed: the retraining, where it differs)")
    right.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- report.md -----------------------------------------------------------------------------------

def render_report(folder: Path, summary: dict, models: dict, board: pd.DataFrame, metric: str,
                  siblings: list[dict]) -> str:
    chosen, pos = summary["chosen"], summary["positive_class"]
    c = models[chosen]["test"]
    data, opts = summary["data"], summary["finalize_options"]
    n_test = sum(data["counts"]["test"].values())
    lines = [
        f"# Final report: {folder.name}",
        "",
        f"**Final model: {chosen}.** On the held-out test split ({n_test} images, never seen by the search "
        f"or by any choice made here) it reaches **AUC {c['auc']:.3f}** (95% CI {_ci(c['ci']['auc'])}), "
        f"**accuracy {c['accuracy']:.3f}**, and for **{pos}** at the threshold chosen on validation "
        f"({c['threshold']:.3f} on p({pos}), Youden's J): **sensitivity {_f(c['sensitivity'])}** "
        f"({_ci(c['ci']['sensitivity'])}), **specificity {_f(c['specificity'])}** ({_ci(c['ci']['specificity'])}), "
        f"PPV {_f(c['ppv'])}, NPV {_f(c['npv'])}.",
        "",
        f"Why this model: {summary['choice']}.",
        "",
        "## Models on the test split",
        "",
        f"Members are the {len([m for m in models.values() if m['kind'] == 'member'])} best distinct "
        f"configurations of the search, each retrained ({opts['seeds']} seed(s), "
        f"{'on train+val' if opts['refit_on_val'] else 'on train'}); `ensemble-mean` averages their "
        f"probabilities, `ensemble-fitted` weights them by greedy ensemble selection on validation. "
        f"Each model's threshold is its own, chosen on validation.",
        "",
        f"| model | val {metric[4:]} | test AUC (95% CI) | accuracy | sensitivity (95% CI) | specificity (95% CI) "
        f"| PPV | NPV | threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in models.items():
        t = m["test"]
        shown = f"**{name}** (final)" if name == chosen else name
        lines.append(f"| {shown} | {m['val'][metric[4:]]:.4f} | {t['auc']:.4f} ({_ci(t['ci']['auc'])}) | "
                     f"{t['accuracy']:.3f} | {_f(t['sensitivity'])} ({_ci(t['ci']['sensitivity'])}) | "
                     f"{_f(t['specificity'])} ({_ci(t['ci']['specificity'])}) | {_f(t['ppv'])} | {_f(t['npv'])} | "
                     f"{t['threshold']:.3f} |")
    if siblings:
        lines += ["", "Other finalized searches on the same data (same fingerprint), their final models:", "",
                  "| experiment | space | model | test AUC (95% CI) | accuracy | sensitivity | specificity |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s in siblings:
            t = s["test"]
            lines.append(f"| {s['experiment']} | {s['space']} | {s['model']} | {t['auc']:.4f} ({_ci(t['ci']['auc'])}) | "
                         f"{t['accuracy']:.3f} | {_f(t['sensitivity'])} | {_f(t['specificity'])} |")
    lines += ["", "![ROC curves](roc.png)", "", f"## {chosen}: per class", "",
              "| class | precision | recall | F1 | AUC (vs rest) | images |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in c["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['auc']:.4f} | "
                     f"{row['support']} |")
    for kind in ("macro", "weighted"):
        a = c[f"{kind}_avg"]
        lines.append(f"| *{kind} average* | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | "
                     f"{c['auc']:.4f} |  |" if kind == "macro" else
                     f"| *{kind} average* | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} |  |  |")
    names = list(c["per_class"])
    lines += ["", "Confusion matrix (rows: true class, columns: predicted at the threshold):", "",
              "| true \\ predicted | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for name, row in zip(names, c["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"Accuracy when each image simply gets its most probable class: {c['accuracy_argmax']:.3f}.", "",
              "![confusion matrix](confusion_matrix.png)", "", "## Members", "",
              "| member | trial | search val " + metric[4:] + " | retrained val " + metric[4:]
              + " | epochs | seeds | test AUC per seed | " + " | ".join(KEY_PARAMS) + " |",
              "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(KEY_PARAMS)]
    for name, m in models.items():
        if m["kind"] != "member":
            continue
        params = " | ".join(_param(m["config"].get(k)) for k in KEY_PARAMS)
        lines.append(f"| {name} | {m['trial_id']} | {m['search'][metric]:.4f} | {m['val'][metric[4:]]:.4f} | "
                     f"{m['epochs']} | {len(m['seeds'])} | {', '.join(f'{a:.4f}' for a in m['test_auc_per_seed'])} | "
                     f"{params} |")
    for name, m in models.items():
        if m["kind"] == "ensemble":
            lines.append("")
            lines.append(f"`{name}` weights: " + ", ".join(f"{n} {w:.2f}" for n, w in m["weights"].items()))
    stopped = int(board["stopped_early"].sum()) if "stopped_early" in board else 0
    failed = int((board["status"] == "ERROR").sum())
    lines += ["", "## The search", "",
              f"Space `{summary['search']['space']}`, {len(board)} trials ({stopped} stopped early by ASHA, {failed} "
              f"failed), optimising validation {metric}; the leaderboard is `../leaderboard.csv`.", "",
              "![search progress](search_progress.png)", "", "![training curves](training_curves.png)", "",
              "## Data", "",
              f"`{data['source']}`, split {data['split_kind']}, fingerprint `{data['fingerprint']}`, images "
              f"{data['image_shape'][0]}x{data['image_shape'][1]}x{data['image_shape'][2]}.", "",
              "| split | " + " | ".join(data["class_names"]) + " |", "| --- |" + " --- |" * len(data["class_names"])]
    for split, counts in data["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts[n]) for n in data["class_names"]) + " |")
    lines += ["", "## Method", "",
              "- The test split took no part in the search, the retraining, the choice of threshold, ensemble "
              "weights or final model: all of those used the validation split.",
              "- Threshold: the point of the validation ROC curve of the positive class (against all others) that "
              "maximises Youden's J = sensitivity + specificity - 1; an image is called positive when its "
              "probability reaches it, otherwise it gets the most probable other class.",
              "- 95% intervals: percentile intervals over "
              f"{opts['bootstrap']} bootstrap resamples of the test images, stratified by class.",
              "- Ensemble weights: greedy ensemble selection with replacement (Caruana et al., 2004) on validation; "
              "the ensemble is final only when it beats the best single member on validation (search metric, then "
              "log loss). The margin's interval comes from the same stratified bootstrap, over validation images, "
              "both models scored on each resample.",
              "", "## Use it", "", "```bash",
              f"python -m search.predict --model {folder}/final/ensemble --images path/to/images --out predictions.csv",
              "```", "",
              "Files: `metrics.json` (everything above), `test_predictions.csv` / `val_predictions.csv` (the final "
              "model's probabilities per image), `ensemble/` (the final model), `members/` (each member alone).",
              "", "Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()
                                            if k in ("python", "torch", "timm", "ray", "optuna", "scikit-learn")), ""]
    return "\n".join(lines)


def _ci(interval) -> str:
    return f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "n/a"


def _param(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
