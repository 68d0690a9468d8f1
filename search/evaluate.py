"""The clinical read-out of a classifier on a held-out split.

The operating threshold is chosen on validation (Youden's J on the ROC curve of the positive class
against the rest) and applied unchanged to test; every label-based figure (accuracy, per-class
precision / recall / F1, confusion matrix, sensitivity, specificity, PPV, NPV) is of the decisions
at that threshold.

Example:
    >>> threshold = youden_threshold(val_labels == 1, val_probs[:, 1])
    >>> report = evaluate(test_labels, test_probs, ["normal", "pneumonia"], positive=1, threshold=threshold)
    >>> report["sensitivity"], report["ci"]["sensitivity"]
"""
from __future__ import annotations

import re

import numpy as np
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix, f1_score, log_loss,
                             roc_auc_score, roc_curve)

from trainables import UserError

# the validation metrics a search can optimise, and which way is better
METRIC_MODES = {"val_auc": "max", "val_acc": "max", "val_f1": "max", "val_loss": "min"}
NEGATIVE_NAMES = re.compile(r"(^|[^a-z])((normal|negative|healthy|benign|control)($|[^a-z])|non|no[-_ ])", re.IGNORECASE)


def positive_class(class_names: list[str], given: str | None = None) -> int:
    """Index of the class the threshold is for: `given` (a class name, any case), else the one
    COVID class, else in a binary task the class that is not normal/negative/non-..., else class 1
    (binary) or the first class not named like a negative one.

    Raises:
        UserError: `given` is not one of the class names.
    """
    if given is not None:
        lowered = [c.lower() for c in class_names]
        if given.lower() not in lowered:
            raise UserError(f"--positive-class {given!r} is not a class of this data; classes: {class_names}")
        return lowered.index(given.lower())
    positives = [i for i, c in enumerate(class_names) if not NEGATIVE_NAMES.search(c)]
    covid = [i for i in positives if "covid" in class_names[i].lower()]
    if len(covid) == 1:
        return covid[0]
    if len(class_names) == 2:
        return positives[0] if len(positives) == 1 else 1
    return positives[0] if positives else 0


def youden_threshold(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises Youden's J = sensitivity + specificity - 1.

    Every threshold between the ROC point's score and the next lower score gives the same J; the
    midpoint of that gap is returned, the choice least sensitive to a shift in the scores."""
    fpr, tpr, thresholds = roc_curve(is_positive, scores)
    upper = float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))
    below = scores[scores < upper]
    return (upper + float(below.max())) / 2 if len(below) else upper


def decide(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Predicted labels: the positive class where its probability reaches `threshold`, otherwise
    the most probable of the other classes."""
    others = probs.copy()
    others[:, positive] = -np.inf
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(1))


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary, or one-vs-rest macro over the classes."""
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=range(probs.shape[1])))


def score(labels: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """A search metric (`val_auc`, `val_acc`, `val_f1`, `val_loss`) of probabilities, higher is better
    except for the loss."""
    if metric == "val_loss":
        probs = np.asarray(probs, np.float64)
        return float(log_loss(labels, probs / probs.sum(1, keepdims=True), labels=range(probs.shape[1])))
    if metric == "val_auc":
        return auc(labels, probs)
    if metric == "val_acc":
        return float(accuracy_score(labels, probs.argmax(1)))
    return float(f1_score(labels, probs.argmax(1), average="macro", labels=range(probs.shape[1]), zero_division=0))


def rates(is_positive: np.ndarray, said_positive: np.ndarray) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV and NPV (None where the denominator is 0)."""
    tp = int(np.sum(is_positive & said_positive))
    fn = int(np.sum(is_positive & ~said_positive))
    tn = int(np.sum(~is_positive & ~said_positive))
    fp = int(np.sum(~is_positive & said_positive))
    return {"sensitivity": _share(tp, fn), "specificity": _share(tn, fp), "ppv": _share(tp, fp),
            "npv": _share(tn, fn), "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def _share(a: int, b: int) -> float | None:
    return a / (a + b) if a + b else None


def stratified_resamples(labels: np.ndarray, num_classes: int, resamples: int, seed: int):
    """Index arrays of bootstrap resamples, each class resampled within itself (so every resample
    has all the classes the labels have)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(members, len(members)) for members in by_class if len(members)])


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, *, positive: int, threshold: float,
                 resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of AUC, sensitivity and specificity over stratified bootstrap
    resamples of the images (each class resampled within itself, so every resample has all classes)."""
    said = decide(probs, positive, threshold) == positive
    is_pos = labels == positive
    draws = {"auc": [], "sensitivity": [], "specificity": []}
    for idx in stratified_resamples(labels, probs.shape[1], resamples, seed):
        draws["auc"].append(auc(labels[idx], probs[idx]))
        r = rates(is_pos[idx], said[idx])
        draws["sensitivity"].append(r["sensitivity"])
        draws["specificity"].append(r["specificity"])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}


def paired_difference(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric: str, *,
                      resamples: int = 1000, seed: int = 0) -> dict:
    """`metric` of model a minus model b on the same images, with a 95% percentile interval over
    stratified bootstrap resamples (both models scored on each resample), to tell a real margin
    from validation noise.

    Example:
        >>> paired_difference(val_labels, ensemble_probs, member_probs, "val_auc")
        {'difference': 0.0004, 'ci': [-0.0011, 0.0019]}
    """
    draws = []
    for idx in stratified_resamples(labels, probs_a.shape[1], resamples, seed):
        draws.append(score(labels[idx], probs_a[idx], metric) - score(labels[idx], probs_b[idx], metric))
    return {"difference": score(labels, probs_a, metric) - score(labels, probs_b, metric),
            "ci": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}


def evaluate(labels: np.ndarray, probs: np.ndarray, class_names: list[str], *, positive: int, threshold: float,
             resamples: int = 1000, seed: int = 0) -> dict:
    """Every figure of the clinical read-out, as plain JSON-able data (see the module docstring)."""
    num_classes = len(class_names)
    pred = decide(probs, positive, threshold)
    report = classification_report(labels, pred, labels=range(num_classes), target_names=class_names,
                                   output_dict=True, zero_division=0)
    per_class = {}
    for c, name in enumerate(class_names):
        row = report[name]
        per_class[name] = {"precision": row["precision"], "recall": row["recall"], "f1": row["f1-score"],
                           "support": int(row["support"]), "auc": float(roc_auc_score(labels == c, probs[:, c]))}
    return {
        "images": int(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "accuracy_argmax": float(accuracy_score(labels, probs.argmax(1))),
        "auc": auc(labels, probs),
        "per_class": per_class,
        **{f"{kind}_avg": {"precision": report[f"{kind} avg"]["precision"], "recall": report[f"{kind} avg"]["recall"],
                           "f1": report[f"{kind} avg"]["f1-score"]} for kind in ("macro", "weighted")},
        "confusion_matrix": confusion_matrix(labels, pred, labels=range(num_classes)).tolist(),
        "positive_class": class_names[positive],
        "threshold": threshold,
        **rates(labels == positive, pred == positive),
        "ci": bootstrap_ci(labels, probs, positive=positive, threshold=threshold, resamples=resamples, seed=seed),
    }
