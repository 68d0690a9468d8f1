"""Calibration: whether a probability of 0.9 is right nine times in ten. Expected calibration error
(top-label, 10 equal-width bins), Brier score and log loss; temperature scaling fitted on the
selection images (Guo et al., 2017: one scalar T divides the logits; each image's most probable class
is unchanged, and with two classes the ranking, so AUC, too).

Example:
    >>> temperature, fitted, gain = choose_temperature(val_labels, val_probs)
    >>> calibration(test_labels, apply_temperature(test_probs, temperature))
    {'ece': 0.021, 'brier': 0.071, 'log_loss': 0.24}
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from search.outputs.evaluate import log_loss, paired_difference

BINS = 10
TEMPERATURES = (0.05, 20.0)  # the range fit_temperature searches


def calibration(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ECE, Brier score (binary: of the class-1 probability, 0 to 1; 3+ classes: summed over the
    classes, 0 to 2) and log loss."""
    classes = list(range(probs.shape[1]))
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 sums drift from 1 by ~1e-7, which sklearn flags
    brier = (brier_score_loss(labels == 1, probs[:, 1]) if probs.shape[1] == 2
             else brier_score_loss(labels, probs, labels=classes))
    return {"ece": expected_calibration_error(labels, probs), "brier": float(brier),
            "log_loss": log_loss(labels, probs)}


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of the top-label confidence: images, mean confidence, accuracy."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        return {"count": count, "confidence": np.bincount(which, confidence, bins) / count,
                "accuracy": np.bincount(which, correct, bins) / count}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (images in the bin / all images) x |accuracy - mean confidence|."""
    r = reliability(labels, probs, bins)
    filled = r["count"] > 0
    return float(np.sum(r["count"][filled] / len(labels) * np.abs(r["accuracy"][filled] - r["confidence"][filled])))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by `temperature` (log-probabilities are logits up to
    a constant per image, so this holds for an ensemble's averaged probabilities too)."""
    z = np.log(np.clip(probs, 1e-12, 1)) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature in TEMPERATURES that minimises the log loss of `probs` on `labels`."""
    result = minimize_scalar(lambda log_t: log_loss(labels, apply_temperature(probs, np.exp(log_t))),
                             bounds=tuple(np.log(TEMPERATURES)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def at_a_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits at an end of the searched range: the log loss had no minimum
    inside it. At the low end that is what images classified all correctly give (sharper is always
    better on them), which says nothing about how calibrated the model is on new images."""
    low, high = TEMPERATURES
    return not low * 1.01 < temperature < high / 1.01


def cross_fitted(labels: np.ndarray, probs: np.ndarray, *, groups: np.ndarray | None = None, folds: int = 5,
                 seed: int = 0) -> np.ndarray:
    """Each image's probabilities scaled by a temperature fitted on the other folds (of patients, with
    `groups`): what temperature scaling does to images it was not fitted on. Unchanged when a class
    has too few images (or patients) for two folds."""
    k = min(folds, int(np.bincount(labels).min()) if groups is None else len(np.unique(groups)))
    if k < 2:
        return probs
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if groups is None
                else StratifiedGroupKFold(k, shuffle=True, random_state=seed))
    out = probs.copy()
    for fit_on, held_out in splitter.split(probs, labels, groups):
        out[held_out] = apply_temperature(probs[held_out], fit_temperature(labels[fit_on], probs[fit_on]))
    return out


def choose_temperature(labels: np.ndarray, probs: np.ndarray, *, groups: np.ndarray | None = None,
                       resamples: int = 1000) -> tuple[float, float, dict]:
    """The temperature to apply, the one fitted on all the images, and the log-loss gain of scaling
    measured on images the temperature was not fitted on (`cross_fitted`; a gain measured on the fit's
    own images is never below 0). The fitted temperature is applied when that gain's 95% bootstrap
    interval lies above 0 and the fit found a minimum inside the searched range; else 1."""
    fitted = fit_temperature(labels, probs)
    gain = paired_difference(labels, probs, cross_fitted(labels, probs, groups=groups), "val_loss",
                             resamples=resamples, groups=groups)
    return (fitted if gain["ci"][0] > 0 and not at_a_bound(fitted) else 1.0), fitted, gain
