"""Start a search from what earlier searches learned (`--warm-start EXPERIMENT`, repeatable): their
finished and stopped trials go into the new study before the sampler's first proposal, with the
parameters the current space still has and their values, and the backbones they tried are not
swept again.

Example:
    >>> earlier = read_studies(["experiments/backbones-seed0"], space="backbones", metric="val_auc",
    ...                        fingerprint=data.fingerprint)
    >>> trials = translate(earlier, space_fn)          # then study.add_trials(trials)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from search.records import read_search_record
from search.tuner import STUDY_FILE, load_study
from trainables import UserError

USED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class Earlier:
    """An earlier search a new one starts from: where it is, its finished and stopped trials, and
    whether its data had the new search's fingerprint."""

    experiment: str
    trials: list[optuna.trial.FrozenTrial]
    same_data: bool

    def record(self, given: int) -> dict:
        return {"experiment": self.experiment, "trials": len(self.trials), "given": given,
                "same_data": self.same_data}


def read_studies(experiments: list[str], *, space: str, metric: str, fingerprint: str) -> list[Earlier]:
    """The studies of `experiments`, checked against the new search.

    Raises:
        UserError: a path that is not an experiment with a study, or one of another space or metric.
    """
    out = []
    for given in experiments:
        folder = Path(given).expanduser().resolve()
        record = read_search_record(folder)
        theirs = record.get("options", {})
        if record.get("space") != space:
            raise UserError(f"--warm-start {given}: that search ran the space {record.get('space')!r}, this one "
                            f"{space!r}; warm-start from searches of the same space")
        if theirs.get("metric") != metric:
            raise UserError(f"--warm-start {given}: that search optimised {theirs.get('metric')!r}, this one "
                            f"{metric!r}; their values cannot be compared (pass the same --metric)")
        if not (folder / STUDY_FILE).is_file():
            raise UserError(f"--warm-start {given}: no {STUDY_FILE} in it (no trial ended there)")
        trials = [t for t in load_study(folder).get_trials(deepcopy=False, states=USED)
                  if "warm_start_from" not in t.user_attrs]  # its own trials only, not what it started from
        out.append(Earlier(experiment=str(folder), trials=trials,
                           same_data=record.get("data", {}).get("fingerprint") == fingerprint))
    return out


def translate(earlier: list[Earlier], space_fn, *, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """The earlier trials as trials of the current space: each keeps the parameters the space still
    draws (at the value it had, where the current space allows it) with the current distributions,
    its value (a finished trial) or its per-epoch scores (a stopped one), and where it came from. A
    trial with a choice the space no longer offers (a backbone not searched now), or that keeps no
    parameter, is left out."""
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for source in earlier:
        for old in source.trials:
            scratch.enqueue_trial(old.params, skip_if_exists=False)
            trial = scratch.ask()
            try:
                space_fn(trial)
            except ValueError:  # a choice the current space no longer offers (a backbone not searched now)
                scratch.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            scratch.tell(trial, state=optuna.trial.TrialState.FAIL)
            kept = {name: value for name, value in trial.params.items()
                    if name in old.params and old.params[name] == value}
            if not kept:
                continue
            out.append(optuna.trial.create_trial(
                params=kept, distributions={name: trial.distributions[name] for name in kept}, state=old.state,
                value=old.value if old.state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values=dict(old.intermediate_values),
                user_attrs={"warm_start_from": source.experiment, "ray_trial_id": old.user_attrs.get("ray_trial_id")},
                system_attrs={k: v for k, v in old.system_attrs.items() if k == "fixed_params"}))
    return out


def tried_backbones(trials: list[optuna.trial.FrozenTrial]) -> set[str]:
    """The backbones the trials tried: their first trials need not be swept again."""
    return {t.params["backbone"] for t in trials if "backbone" in t.params}
