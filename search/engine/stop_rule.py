"""When a search stops: once more trials no longer beat the best by more than validation resolves.

    >>> rule = StopRule(patience=2, mode="max")
    >>> rule.update("a", 0.950, 0.004, proposed=False)   # a first trial: the best
    False
    >>> rule.update("b", 0.952, 0.004, proposed=True)    # better, but within 0.004: not resolved
    False
    >>> rule.update("c", 0.940, 0.005, proposed=True)    # the 2nd proposal in a row that adds nothing
    True
    >>> ceiling = StopRule(patience=4, mode="max", ceiling=1.0)
    >>> ceiling.update("d", 0.997, 0.004, proposed=False)  # 1.0 - 0.997 is within 0.004: nothing to resolve
    True

Optuna's terminator stops a study when the room left for improvement (a regret bound from a Gaussian
process over the COMPLETE trials, or the trials since the best value last moved) falls below the
statistical error of the best trial (its cross-validation error). Here most trials end PRUNED (ASHA
stops them), a CPU search runs 24 trials where the regret bound wants 20 COMPLETE ones before it
judges, and `optuna.terminator` is deprecated for removal in Optuna 6. So the rule takes two
bounds a search can compute without a model, against the terminator's error, and the search stops
at the first that holds:

- the ceiling: a metric that cannot exceed 1 (AUC, accuracy, F1) leaves the best trial at most
  1 - best to gain; once that is within the best's validation error, no trial, started or not, can
  beat it by more than validation resolves (an AUC of 0.997 on 270 validation images);
- stagnation (the terminator's other form): `patience` trials proposed by the sampler in a row have
  not beaten the baseline by more than its validation error, once every first trial (the sweep at
  fixed values) has ended. The baseline is the best at the last resolved improvement, not the best
  seen: a run of small gains (0.80, 0.82, 0.84, 0.86 with an error of 0.03) counts as progress once
  it adds up to more than the error (0.86 beats the baseline 0.80 by more than 0.03), where a
  baseline moved by every small gain would call each step unresolved and stop after four.

A trial counts at its best epoch, the value the leaderboard ranks it by, whether it ran to the end
or ASHA stopped it. A running trial counts too, at its best epoch so far: stagnation does not hold
while one has already beaten the baseline by more than its error (it will end as a resolved
improvement; stopping it would throw that away). When the rule holds, no trial starts and the running
ones stop where they are (the same bound holds for them; they keep their checkpoints, and finalize
goes on from them).

The error is what validation can resolve: with K folds, Optuna's CrossValidationErrorEvaluator
(the fold scores' spread times sqrt(1/K + 1/(K-1))); with one validation split, the standard error
of the metric on that split (Hanley and McNeil 1982 for AUC, per class against the rest and
averaged; binomial for accuracy and F1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def validation_error(result: dict, metric: str, val_counts: list[int] | None) -> float | None:
    """The error of `result[metric]` validation can resolve (see the module docstring); None when it
    has neither folds nor a closed form (the loss of one validation split)."""
    value, folds = result.get(metric), int(result.get("folds") or 1)
    if value is None:
        return None
    if folds > 1 and f"{metric}_std" in result:
        return float(result[f"{metric}_std"]) * math.sqrt(1 / folds + 1 / (folds - 1))
    if not val_counts or sum(val_counts) < 2:
        return None
    if metric == "val_auc":
        total = sum(val_counts)
        per_class = [hanley_mcneil(value, n, total - n) for n in val_counts if 0 < n < total]
        return sum(per_class) / len(per_class) if per_class else None
    if metric in ("val_acc", "val_f1"):
        return math.sqrt(max(value * (1 - value), 0.0) / sum(val_counts))
    return None


def hanley_mcneil(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC measured on `positives` and `negatives` cases (Hanley & McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) \
        / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


@dataclass
class StopRule:
    """The state of the rule as trials end (plain data: it travels with the searcher's state).
    `first`: the first trials at fixed values still to end; the rule judges only once none is left."""

    patience: int
    mode: str
    first: int = 0
    ceiling: float | None = None  # the metric's largest possible value (mode "max"), if it has one
    best_trial: str | None = None
    best: float | None = None
    best_error: float | None = None
    baseline_trial: str | None = None  # the best at the last resolved improvement: what a trial must beat
    baseline: float | None = None
    baseline_error: float | None = None
    since: int = 0
    ended: int = 0
    stopped: str | None = None  # which bound held: "ceiling" or "stagnation"

    def update(self, trial_id: str, value: float | None, error: float | None, *, proposed: bool,
               running: tuple[float, ...] = ()) -> bool:
        """Take one ended trial (`value` None: it failed or reported nothing) and the best value so far
        of each trial still running; returns whether the search should stop now."""
        self.ended += 1
        if not proposed:
            self.first = max(self.first - 1, 0)
        if value is None or math.isnan(value):
            return bool(self.stopped)
        if self.best is None or self._beats(value, self.best, 0.0):
            self.best_trial, self.best, self.best_error = trial_id, value, error
        if self.baseline is None or self._beats(value, self.baseline, self.baseline_error or 0.0):
            self.baseline_trial, self.baseline, self.baseline_error = trial_id, value, error
            self.since = 0
        elif proposed:
            self.since += 1
        if self.stopped or self.best_error is None:
            return bool(self.stopped)
        if self.ceiling is not None and self.mode == "max" and self.ceiling - self.best <= self.best_error:
            self.stopped = "ceiling"
        elif self.first == 0 and self.since >= self.patience and not any(
                self._beats(v, self.baseline, self.baseline_error or 0.0) for v in running):
            self.stopped = "stagnation"
        return bool(self.stopped)

    def _beats(self, value: float, than: float, margin: float) -> bool:
        return value > than + margin if self.mode == "max" else value < than - margin

    def record(self) -> dict:
        return asdict(self)

    def reason(self, metric: str) -> str:
        if self.stopped == "ceiling":
            return (f"the best trial ({self.best_trial}, {metric} {self.best:.4f}) is within its validation error "
                    f"(+-{self.best_error:.4f}) of the metric's ceiling ({self.ceiling:g}): no trial can beat it by "
                    f"more than validation resolves")
        return (f"the last {self.since} trials the sampler proposed did not beat the last resolved improvement (trial "
                f"{self.baseline_trial}, {metric} {self.baseline:.4f}) by more than validation resolves "
                f"(+-{self.baseline_error or 0.0:.4f}); the best is trial {self.best_trial}, {self.best:.4f}")


def stop_record(rule: StopRule | None, *, metric: str, num_samples: int, trials: int, fit_seconds: float,
                time_budget: float | None) -> dict:
    """What timings.json and the report say of the stop rule once the search has run `trials`."""
    if rule is None:
        return {"on": False}
    out = {"on": True, "patience": rule.patience, "stopped": bool(rule.stopped), "bound": rule.stopped,
           "best_trial": rule.best_trial,
           "best": rule.best, "error": rule.best_error, "baseline_trial": rule.baseline_trial,
           "baseline": rule.baseline, "proposed_since_best": rule.since}
    if rule.stopped:
        out.update(reason=rule.reason(metric), trials_run=trials, trials_unspent=max(num_samples - trials, 0),
                   budget_seconds=time_budget,
                   budget_unspent_seconds=max(time_budget - fit_seconds, 0.0) if time_budget else None)
    return out
