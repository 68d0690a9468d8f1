"""Validation metrics reported after every epoch.

Example:
    >>> classification_metrics(np.array([0, 1, 1]), np.array([[.9, .1], [.2, .8], [.6, .4]]))
    {'auc': 1.0, 'acc': 0.6666666666666666, 'f1': 0.6666666666666666}
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

# what every epoch reports on validation, and which way is better (the search optimises one of them)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ROC AUC (one-vs-rest macro for more than two classes), accuracy and macro F1."""
    num_classes = probs.shape[1]
    if num_classes == 2:
        auc = roc_auc_score(y_true, probs[:, 1])
    else:
        auc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=range(num_classes))
    pred = probs.argmax(1)
    return {"auc": float(auc), "acc": float(accuracy_score(y_true, pred)),
            "f1": float(f1_score(y_true, pred, average="macro", labels=range(num_classes), zero_division=0))}
