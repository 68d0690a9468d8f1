"""The clinical read-out of a classifier on a held-out split.

The operating threshold is chosen on validation (Youden's J on the ROC curve of the positive class
against the rest) and applied unchanged to test; every label-based figure (accuracy, balanced
accuracy, per-class precision / recall / F1, confusion matrix, sensitivity, specificity, PPV, NPV) is
of the decisions at that threshold. For imbalanced classes the read-out also gives the precision-recall
AUC of the positive class (against its chance level, the positive share) and the accuracy of always
calling the most common class.

Example:
    >>> threshold = youden_threshold(val_labels == 1, val_probs[:, 1])
    >>> report = evaluate(test_labels, test_probs, ["normal", "pneumonia"], positive=1, threshold=threshold)
    >>> report["sensitivity"], report["ci"]["sensitivity"]
"""
from __future__ import annotations

import re

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, classification_report,
                             confusion_matrix, roc_auc_score, roc_curve)

from core.errors import UserError

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


# auc, score and log_loss give sklearn's figures computed directly with numpy: the bootstrap intervals and
# paired differences call them thousands of times, where sklearn's input checks took 40 of finalize's 58
# seconds on a tiny search


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary, or one-vs-rest macro over the classes (nan when a class has no image, as
    sklearn's roc_auc_score gives)."""
    if probs.shape[1] == 2:
        return _binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([_binary_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]))


def _binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """The Mann-Whitney U of the positives' scores over the negatives' (ties count a half), scaled to 0..1."""
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[is_positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-probability of each image's class, the probabilities normalised per image and
    clipped to [eps, 1 - eps] (as sklearn's log_loss)."""
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(1, keepdims=True)
    eps = np.finfo(np.float64).eps
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1 - eps))))


def score(labels: np.ndarray, probs: np.ndarray, metric: str) -> float:
    """A search metric (`val_auc`, `val_acc`, `val_f1`, `val_loss`) of probabilities, higher is better
    except for the loss. `val_f1` is the macro F1 over every class (0 for a class neither present nor
    predicted)."""
    if metric == "val_loss":
        return log_loss(labels, probs)
    if metric == "val_auc":
        return auc(labels, probs)
    predicted = probs.argmax(1)
    if metric == "val_acc":
        return float(np.mean(predicted == labels))
    k = probs.shape[1]
    hits = np.bincount(labels[predicted == labels], minlength=k)
    either = np.bincount(predicted, minlength=k) + np.bincount(labels, minlength=k)
    return float(np.mean(np.divide(2 * hits, either, out=np.zeros(k), where=either > 0)))


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


def stratified_resamples(labels: np.ndarray, num_classes: int, resamples: int, seed: int,
                         groups: np.ndarray | None = None):
    """Index arrays of bootstrap resamples, each class resampled within itself (so every resample
    has all the classes the labels have). With `groups` (patient ids) whole patients are drawn, each
    with all its images, stratified by the patient's most common class: the patient, not the image,
    is the independent unit."""
    rng = np.random.default_rng(seed)
    if groups is None:
        by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        for _ in range(resamples):
            yield np.concatenate([rng.choice(members, len(members)) for members in by_class if len(members)])
        return
    _, unit_of = np.unique(groups, return_inverse=True)
    units = [np.flatnonzero(unit_of == u) for u in range(unit_of.max() + 1)]
    unit_class = np.array([np.bincount(labels[u], minlength=num_classes).argmax() for u in units])
    by_class = [np.flatnonzero(unit_class == c) for c in range(num_classes)]
    for _ in range(resamples):
        drawn = np.concatenate([rng.choice(members, len(members)) for members in by_class if len(members)])
        yield np.concatenate([units[u] for u in drawn])


def wilson(successes: int, trials: int, *, units: int | None = None, z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval of the proportion successes / trials (None when trials is 0). It
    never collapses to a point at 0 or 1, unlike a bootstrap of a perfect score. With `units` (the
    independent units behind the trials, e.g. patients), the same proportion over that many."""
    if trials == 0:
        return None
    p, n = successes / trials, units or trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, *, positive: int, threshold: float,
                         resamples: int = 1000, seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """95% intervals: AUC as the percentile interval over stratified bootstrap resamples (of
    patients when `groups` are given); sensitivity, specificity, PPV and NPV as Wilson intervals
    (counting patients rather than images when `groups` are given)."""
    draws = [auc(labels[idx], probs[idx]) for idx in stratified_resamples(labels, probs.shape[1], resamples, seed,
                                                                          groups)]
    said = decide(probs, positive, threshold) == positive
    is_pos = labels == positive
    out = {"auc": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}
    for name, among, hit in (("sensitivity", is_pos, said), ("specificity", ~is_pos, ~said),
                             ("ppv", said, is_pos), ("npv", ~said, ~is_pos)):
        units = len(np.unique(groups[among])) if groups is not None else None
        out[name] = wilson(int((among & hit).sum()), int(among.sum()), units=units)
    return out


def paired_difference(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric: str, *,
                      resamples: int = 1000, seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """`metric` of model a minus model b on the same images, with a 95% percentile interval over
    stratified bootstrap resamples (of patients, with `groups`; both models scored on each
    resample), to tell a real margin from validation noise.

    Example:
        >>> paired_difference(val_labels, ensemble_probs, member_probs, "val_auc")
        {'difference': 0.0004, 'ci': [-0.0011, 0.0019]}
    """
    draws = []
    for idx in stratified_resamples(labels, probs_a.shape[1], resamples, seed, groups):
        draws.append(score(labels[idx], probs_a[idx], metric) - score(labels[idx], probs_b[idx], metric))
    return {"difference": score(labels, probs_a, metric) - score(labels, probs_b, metric),
            "ci": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}


def evaluate(labels: np.ndarray, probs: np.ndarray, class_names: list[str], *, positive: int, threshold: float,
             resamples: int = 1000, seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """Every figure of the clinical read-out, as plain JSON-able data (see the module docstring)."""
    num_classes = len(class_names)
    pred = decide(probs, positive, threshold)
    report = classification_report(labels, pred, labels=range(num_classes), target_names=class_names,
                                   output_dict=True, zero_division=0)
    per_class = {}
    for c, name in enumerate(class_names):
        row = report[name]
        per_class[name] = {"precision": row["precision"], "recall": row["recall"], "f1": row["f1-score"],
                           "support": int(row["support"]), "auc": float(roc_auc_score(labels == c, probs[:, c])),
                           "pr_auc": float(average_precision_score(labels == c, probs[:, c]))}
    majority = int(np.bincount(labels, minlength=num_classes).argmax())
    return {
        "images": int(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "accuracy_argmax": float(accuracy_score(labels, probs.argmax(1))),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        # what calling every image the most common class scores: accuracy below it means little
        "majority_baseline": {"class": class_names[majority], "accuracy": float(np.mean(labels == majority))},
        "auc": auc(labels, probs),
        # precision-recall AUC (average precision) of the positive class; chance is its share of the images
        "pr_auc": per_class[class_names[positive]]["pr_auc"],
        "pr_auc_chance": float(np.mean(labels == positive)),
        "per_class": per_class,
        **{f"{kind}_avg": {"precision": report[f"{kind} avg"]["precision"], "recall": report[f"{kind} avg"]["recall"],
                           "f1": report[f"{kind} avg"]["f1-score"]} for kind in ("macro", "weighted")},
        "confusion_matrix": confusion_matrix(labels, pred, labels=range(num_classes)).tolist(),
        "positive_class": class_names[positive],
        "threshold": threshold,
        **rates(labels == positive, pred == positive),
        "ci": confidence_intervals(labels, probs, positive=positive, threshold=threshold, resamples=resamples,
                                   seed=seed, groups=groups),
    }
