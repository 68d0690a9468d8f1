"""The figures people would rather look at than read, every one of them: the search over time, ROC
curves, the confusion matrix, calibration, training curves, what mattered in the search, the data
preview. Each function writes one PNG.

Example:
    >>> plot_confusion([[50, 3], [4, 60]], ["normal", "pneumonia"], "ensemble-mean", Path("cm.png"))
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from search.outputs.calibration import BINS, expected_calibration_error, reliability
from search.outputs.records import write_atomic

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_roc(models: dict, chosen: str, test_y, names, positive: int, path: Path) -> None:
    """Left: the positive class against the rest for every model, each operating point marked.
    Right (3+ classes): the chosen model's one-vs-rest curve per class."""
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
    save(fig, path)


def plot_external_roc(curves: list[tuple[str, np.ndarray, np.ndarray, dict]], positive_name: str, path: Path) -> None:
    """The positive class against the rest on the internal test and on each external set: (label, is
    positive, probability of the positive class, read-out) per curve, the model's threshold marked on each."""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for k, (label, is_positive, scores, figures) in enumerate(curves):
        fpr, tpr, _ = roc_curve(is_positive, scores)
        line, = ax.plot(fpr, tpr, lw=2.2 if k == 0 else 1.6, ls="-" if k == 0 else "--",
                        label=f"{label}: AUC {figures['per_class'][positive_name]['auc']:.3f}")
        if figures["sensitivity"] is not None and figures["specificity"] is not None:
            ax.plot(1 - figures["specificity"], figures["sensitivity"], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title=f"{positive_name} vs rest, internal and external (dots: the model's threshold)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_confusion(matrix: list[list[int]], names: list[str], title: str, path: Path) -> None:
    """Counts, with each row's share (the per-class recall on the diagonal)."""
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
    save(fig, path)


def plot_training_curves(folder: Path, board: pd.DataFrame, members: list[dict], metric: str, path: Path) -> None:
    """Validation metric and train loss per epoch: the top trials of the search (solid) and the
    retrained members (dashed, first seed)."""
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
        if trial_id in retrained and retrained[trial_id]["runs"][0]["history"]:  # empty: the trial's own network
            history = pd.DataFrame(retrained[trial_id]["runs"][0]["history"])
            left.plot(history["epoch"], history[metric], ls="--", color=line.get_color())
            right.plot(history["epoch"], history["train_loss"], ls="--", color=line.get_color())
    left.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (dashed: the retraining, where it differs)")
    right.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    save(fig, path)


def plot_progress(board: pd.DataFrame, path: Path, *, metric: str, mode: str, name: str) -> None:
    """`path` (search_progress.png): each trial's best metric at the time it ended, ASHA stops
    marked, and the best so far."""
    frame = board.dropna(subset=["ended_s", metric]).sort_values("ended_s") if not board.empty else board
    if frame.empty:
        return
    minutes, stopped = frame["ended_s"] / 60, frame["stopped_early"].astype(bool)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(minutes[~stopped], frame[metric][~stopped], label="ran all epochs", zorder=3)
    ax.scatter(minutes[stopped], frame[metric][stopped], marker="x", label="stopped early by ASHA", zorder=3)
    best = frame[metric].cummax() if mode == "max" else frame[metric].cummin()
    ax.step(minutes, best, where="post", color="gray", lw=1, label="best so far")
    ax.set_xlabel("minutes since the search started (when the trial ended)")
    ax.set_ylabel(f"{metric} at the trial's best epoch")
    ax.set_title(f"search progress: {name} ({len(frame)} trials, {int(stopped.sum())} stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, path)


def plot_calibration(labels: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float, title: str,
                     path: Path) -> None:
    """Reliability diagram of the top-label confidence on test, before and after temperature
    scaling (left), and how many images fall in each confidence bin (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    left.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="perfectly calibrated")
    width = 1 / BINS
    for label, probs, marker in (("before", before, "s"), (f"after (T = {temperature:.2f})", after, "o")):
        r = reliability(labels, probs)
        filled = r["count"] > 0
        left.plot(r["confidence"][filled], r["accuracy"][filled], marker=marker,
                  label=f"{label}: ECE {expected_calibration_error(labels, probs):.3f}")
        right.bar(np.arange(BINS)[filled] * width + width / 2 + (0.2 if marker == "o" else -0.2) * width,
                  r["count"][filled], width=0.4 * width, label=label)
    left.set(xlabel="confidence (top-label probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
             title=f"test reliability: {title}")
    right.set(xlabel="confidence", ylabel="test images", title=f"images per confidence bin ({BINS} bins)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    save(fig, path)


def plot_saliency(rows: dict[str, list[tuple[np.ndarray, str]]], title: str, path: Path) -> None:
    """A grid of overlays: one row per entry of `rows` (its name on the left), each panel an RGB
    image with its caption."""
    width = max([len(panels) for panels in rows.values()] + [1])
    fig, axes = plt.subplots(len(rows), width, figsize=(2.6 * width + 1, 2.9 * len(rows)), squeeze=False)
    for r, (row, panels) in enumerate(rows.items()):
        for c in range(width):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(panels):
                ax.imshow(panels[c][0])
                ax.set_title(panels[c][1], fontsize=8)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(row if panels else f"{row}: none", fontsize=10)
        if not panels:
            axes[r, 0].axis("on")
            axes[r, 0].set_frame_on(False)
    fig.suptitle(title)
    save(fig, path)


def save(fig, path: Path) -> None:
    """Lay out, write (atomically: a reader never sees half a PNG) and close a figure."""
    fig.tight_layout()
    try:
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def plot_importance(found: dict[str, float], board: pd.DataFrame, metric: str, path: Path) -> None:
    """Left: the importances. Right: every trial's metric (colour) against the two most important
    hyperparameters."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(found)[::-1]
    left.barh(names, [found[n] for n in names])
    left.set(xlabel="importance (fANOVA, share of the score's variance)", title="what mattered in the search")
    first, second = list(found)[:2]
    frame = board.dropna(subset=[metric])
    points = right.scatter(_axis(right, frame[first], "x"), _axis(right, frame[second], "y"), c=frame[metric],
                           cmap="viridis", s=40, edgecolors="black", linewidths=0.3)
    fig.colorbar(points, ax=right, label=f"{metric} at the trial's best epoch")
    right.set(xlabel=first, ylabel=second, title=f"{metric} of every trial against the two most important")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save(fig, path)


def _axis(ax, values: pd.Series, which: str) -> np.ndarray:
    """Positions for a column: categories spread on ticks, wide positive ranges on a log scale."""
    set_ticks, set_scale = (ax.set_xticks, ax.set_xscale) if which == "x" else (ax.set_yticks, ax.set_yscale)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        if (numeric > 0).all() and numeric.max() / numeric.min() > 100:
            set_scale("log")
        return numeric.to_numpy()
    categories = sorted(values.astype(str).unique())
    set_ticks(range(len(categories)), categories, **({"rotation": 30} if which == "x" else {}))
    return values.astype(str).map(categories.index).to_numpy() + np.random.default_rng(0).uniform(-0.15, 0.15, len(values))


def plot_preview(data, path: Path, per_class: int = 6) -> None:
    """A few training images per class of a `Dataset` as the trials receive them (`data_preview.png`)."""
    train, rows = data.indices("train"), {}
    for k, name in enumerate(data.class_names):
        chosen = train[data.labels[train] == k][:per_class]
        images = data.images[chosen] if len(chosen) else []
        rows[name] = [(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image,
                       Path(data.paths[i]).name[-24:] if data.paths else f"#{i}") for image, i in zip(images, chosen)]
    side = data.images.shape[1]
    plot_saliency(rows, f"What the trials see: training images per class ({side} px, before augmentation)", path)
