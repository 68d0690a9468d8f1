"""Members and ensembles, scored on the selection images and on test, and the final model chosen.

A member is one retrained configuration (the mean of its seeds). `ensemble-mean` averages the
members' probabilities; `ensemble-fitted` weights them by greedy ensemble selection on validation.
The better ensemble is final only when it beats the best single member on validation.

Every choice (thresholds, weights, the final model) is made on the selection images: the val split,
or in a cross-validated search the pooled out-of-fold predictions of train+val.

Example:
    >>> models = score_models(members, data, selection=data.indices("val"), positive=1, metric="val_auc",
    ...                       resamples=1000)
    >>> chosen, why, margin = choose(models, data, data.indices("val"), "val_auc", resamples=1000)
"""
from __future__ import annotations

import numpy as np

from search.outputs.calibration import TEMPERATURES, apply_temperature, at_a_bound, calibration, choose_temperature
from search.outputs.evaluate import auc, evaluate, paired_difference, score, youden_threshold
from ingest.dataset import Dataset
from core.choices import METRIC_MODES


def ensemble_weights(val_probs: list[np.ndarray], labels: np.ndarray, metric: str, *, rounds: int = 20) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al., 2004): start empty, and `rounds`
    times add the member whose addition scores best on validation (`metric`, then log loss to break
    ties); the weights are how often each was added.

    Example:
        >>> ensemble_weights([p1, p2, p3], val_labels, "val_auc")
        array([0.55, 0.3 , 0.15])
    """
    counts = np.zeros(len(val_probs))
    total = np.zeros_like(val_probs[0])
    for _ in range(rounds):
        keys = [validation_key(labels, (total + p) / (counts.sum() + 1), metric) for p in val_probs]
        best = max(range(len(val_probs)), key=lambda i: keys[i])
        counts[best] += 1
        total = total + val_probs[best]
    return counts / counts.sum()


def validation_key(labels: np.ndarray, probs: np.ndarray, metric: str) -> tuple[float, float]:
    """Higher is better: the search metric (negated for a loss), then negated log loss."""
    primary = score(labels, probs, metric)
    return (-primary if METRIC_MODES[metric] == "min" else primary, -score(labels, probs, "val_loss"))


def score_models(members: list[dict], data: Dataset, *, selection: np.ndarray, positive: int, metric: str,
                 resamples: int) -> dict:
    """Every member (its seeds averaged) and, with two or more members, both ensembles: each with
    its figures on the `selection` images (keyed `val`), its threshold (Youden's J there), the test
    read-out (intervals over patients where the data has patient ids) and its calibration on test."""
    test_y = data.labels[data.indices("test")]

    def scored(entry, val_probs, test_probs):
        return score_model(entry, val_probs, test_probs, data, selection=selection, positive=positive,
                           resamples=resamples)

    models = {}
    for member in members:
        runs = member["runs"]
        entry = {"kind": "member", "trial_id": member["trial_id"], "config": member["config"],
                 "epochs": member["epochs"], "warm_restart_epochs": member.get("warm_restart_epochs", 0),
                 "seeds": [r["seed"] for r in runs], "search": member["search"],
                 "from_trial_epoch": int(runs[0].get("from_trial_epoch", 0)),
                 "test_auc_per_seed": [auc(test_y, r["test"]) for r in runs]}
        models[member["name"]] = scored(entry, np.mean([r["val"] for r in runs], 0),
                                        np.mean([r["test"] for r in runs], 0))
    names = list(models)
    if len(names) > 1:
        fitted = ensemble_weights([models[n]["val_probs"] for n in names], data.labels[selection], metric)
        for kind, weights in (("mean", np.full(len(names), 1 / len(names))), ("fitted", fitted)):
            entry = {"kind": "ensemble", "weighting": kind, "weights": dict(zip(names, weights.tolist()))}
            models[f"ensemble-{kind}"] = scored(entry, sum(w * models[n]["val_probs"] for w, n in zip(weights, names)),
                                                sum(w * models[n]["test_probs"] for w, n in zip(weights, names)))
    return models


def score_model(entry: dict, val_probs: np.ndarray, test_probs: np.ndarray, data: Dataset, *,
                selection: np.ndarray, positive: int, resamples: int) -> dict:
    """One model's figures: on the selection images (`val`, with the Youden threshold there), the
    test read-out at that threshold, and its calibration on test."""
    val_y, test = data.labels[selection], data.indices("test")
    test_y = data.labels[test]
    threshold = youden_threshold(val_y == positive, val_probs[:, positive])
    val = {m[4:]: score(val_y, val_probs, m) for m in METRIC_MODES} | {"threshold": threshold}
    read_out = evaluate(test_y, test_probs, data.class_names, positive=positive, threshold=threshold,
                        resamples=resamples, seed=0, groups=None if data.groups is None else data.groups[test])
    return {**entry, "val": val, "test": read_out, "calibration": calibration(test_y, test_probs),
            "val_probs": val_probs, "test_probs": test_probs}


def calibrate(model: dict, data: Dataset, *, selection: np.ndarray, positive: int, resamples: int) -> dict:
    """The model with temperature scaling fitted on the selection images, applied when it lowers
    the log loss of images it was not fitted on beyond bootstrap noise (`choose_temperature`) and the
    fit found a minimum inside the searched range; otherwise T stays 1: a fit to noise, or to
    selection images that are all classified right, can only hurt test. The probabilities, the threshold (chosen
    on the calibrated scores) and the test figures are then the calibrated ones; the calibration on
    test before and after, the fitted and the applied temperature are kept."""
    temperature, fitted, gain = choose_temperature(data.labels[selection], model["val_probs"], resamples=resamples,
                                                   groups=None if data.groups is None else data.groups[selection])
    scaled = score_model({k: v for k, v in model.items() if k not in ("val", "test", "calibration")},
                         apply_temperature(model["val_probs"], temperature),
                         apply_temperature(model["test_probs"], temperature), data, selection=selection,
                         positive=positive, resamples=resamples)
    return {**scaled, "temperature": temperature, "uncalibrated_test_probs": model["test_probs"],
            "calibration": {**scaled["calibration"], "before": model["calibration"], "temperature": temperature,
                            "fitted_temperature": fitted, "fitted_at_range_end": at_a_bound(fitted),
                            "temperature_range": list(TEMPERATURES), "selection_log_loss_gain": gain}}


def choose(models: dict, data: Dataset, selection: np.ndarray, metric: str, *, resamples: int,
           where: str = "validation") -> tuple[str, str, dict | None]:
    """The best ensemble weighting on the selection images (`where` names them in the reason),
    kept only when it beats the best single member there; returns its name, why, and the margin
    over the runner-up with its bootstrap interval."""
    val_y, groups = data.labels[selection], None if data.groups is None else data.groups[selection]
    key = {n: validation_key(val_y, m["val_probs"], metric) for n, m in models.items()}
    best_member = max((n for n, m in models.items() if m["kind"] == "member"), key=lambda n: key[n])
    ensembles = [n for n, m in models.items() if m["kind"] == "ensemble"]
    if not ensembles:
        return best_member, "one configuration was retrained: it is the final model", None
    best_ensemble = max(ensembles, key=lambda n: key[n])  # max keeps the first (mean) on a tie

    def shown(n):
        return f"{metric} {models[n]['val'][metric[4:]]:.4f}, log loss {models[n]['val']['loss']:.4f}"

    if key[best_ensemble] > key[best_member]:
        chosen, runner_up = best_ensemble, best_member
        choice = (f"{best_ensemble} ({shown(best_ensemble)}) beats the best single model "
                  f"{best_member} ({shown(best_member)}) on {where}")
    else:
        chosen, runner_up = best_member, best_ensemble
        choice = (f"the best single model {best_member} ({shown(best_member)}) is at least as good on "
                  f"{where} as the best ensemble {best_ensemble} ({shown(best_ensemble)}), so it is "
                  f"the final model and final/ensemble holds it alone")
    margin = {"metric": metric, "versus": runner_up, **paired_difference(
        val_y, models[chosen]["val_probs"], models[runner_up]["val_probs"], metric, resamples=resamples,
        groups=groups)}
    lo, hi = margin["ci"]
    choice += (f"; {metric} difference {margin['difference']:+.4f} (95% CI {lo:+.4f} to {hi:+.4f} over "
               f"resamples of the {where} images)")
    if lo <= 0 <= hi:
        choice += (f", within noise: the {where} images cannot tell {chosen} and {runner_up} apart (both are "
                   f"in the table below)")
    return chosen, choice, margin
