"""What mattered in the search: hyperparameter importances (fANOVA, Hutter et al., 2014, as Optuna
computes it) over the trials whose parameters the sampler chose and that ran to the end, and the
metric against the two that mattered most. The first trials (one per backbone at fixed values, or
the recipes) are left out: their parameters do not vary but for the backbone, so they would credit
the backbone with every difference between them.

Example:
    >>> importances(load_study(folder))
    {'values': {'backbone': 0.61, 'lr': 0.22, ...}, 'trials': 14, 'fixed': 9, 'minimum': 10}
"""
from __future__ import annotations

import optuna
from optuna.importance import FanovaImportanceEvaluator, get_param_importances

# fewer sampled trials than this that ran to the end, and the importances would be noise
MIN_TRIALS = 10


def importances(study: optuna.Study, *, seed: int = 0) -> dict:
    """`values`: each hyperparameter's share of the variance of the scores of the sampled trials that
    ran to the end (normalised to sum to 1), over the parameters all of them have; None below
    `MIN_TRIALS` such trials or with fewer than 2 such parameters. `trials`: how many were used;
    `fixed`: the finished first trials left out (enqueued at fixed values); `warm`: the finished
    trials of a warm start left out; `minimum`: MIN_TRIALS."""
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # not the first trials at fixed values, nor a warm start's trials (another search's, maybe other data)
    sampled = [t for t in finished if "fixed_params" not in t.system_attrs and "warm_start_from" not in t.user_attrs]
    shared = set.intersection(*(set(t.params) for t in sampled)) if sampled else set()
    warm = sum("warm_start_from" in t.user_attrs for t in finished)
    out = {"values": None, "trials": len(sampled), "fixed": len(finished) - len(sampled) - warm, "warm": warm,
           "minimum": MIN_TRIALS}
    if len(sampled) < MIN_TRIALS or len(shared) < 2:
        return out
    varied = optuna.create_study(direction=study.direction)
    varied.add_trials(sampled)
    found = get_param_importances(varied, evaluator=FanovaImportanceEvaluator(seed=seed))
    out["values"] = {name: float(value) for name, value in found.items()}
    return out
