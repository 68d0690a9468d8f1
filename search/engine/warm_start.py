"""Start a search from what earlier searches learned (`--warm-start EXPERIMENT`, repeatable): their
finished and stopped trials go into the new study before the sampler's first proposal, with the
parameters the current space still has and their values, and the backbones they tried are not
swept again.

Example:
    >>> earlier = read_studies(["experiments/backbones-seed0"], space="backbones", metric="val_auc",
    ...                        fingerprint=data.fingerprint)
    >>> trials, dropped = translate(earlier, space_fn)  # then study.add_trials(trials)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from core.errors import UserError
from search.engine.ray_internals import distribution_holds
from search.outputs.records import read_search_record
from search.engine.tuner import STUDY_FILE, load_study

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


# the options that decide what a trial's score means: scores made under others cannot be compared
SCORED_BY = {"image_size": "image size", "max_epochs": "epochs", "folds": "folds", "weights": "weights",
             "ct_window": "CT window", "early_size": "first-rung size"}
# what searches that predate an option ran with (they did not record it)
BEFORE_RECORDED = {"early_size": 0}


def read_studies(experiments: list[str], *, space: str, metric: str, fingerprint: str,
                 scored: dict | None = None) -> list[Earlier]:
    """The studies of `experiments` (each once), checked against the new search: the same space and
    metric, and with `scored` (the new search's values of SCORED_BY) the same way of scoring a trial.

    Raises:
        UserError: a path that is not an experiment with a study, or one of another space, metric or
            way of scoring.
    """
    out = []
    for given in dict.fromkeys(experiments):
        folder = Path(given).expanduser().resolve()
        if any(e.experiment == str(folder) for e in out):
            continue
        record = read_search_record(folder)
        theirs = record.get("options", {})
        if record.get("space") != space:
            raise UserError(f"--warm-start {given}: that search ran the space {record.get('space')!r}, this one "
                            f"{space!r}; warm-start from searches of the same space")
        if theirs.get("metric") != metric:
            raise UserError(f"--warm-start {given}: that search optimised {theirs.get('metric')!r}, this one "
                            f"{metric!r}; their values cannot be compared (pass the same --metric)")
        differ = [f"{label} {theirs.get(key, BEFORE_RECORDED.get(key))!r} there, {scored[key]!r} here"
                  for key, label in SCORED_BY.items()
                  if scored is not None and theirs.get(key, BEFORE_RECORDED.get(key)) != scored[key]]
        if differ:
            raise UserError(f"--warm-start {given}: that search scored its trials differently ({'; '.join(differ)}); "
                            f"their values cannot be compared: warm-start from a search with the same settings")
        if not (folder / STUDY_FILE).is_file():
            raise UserError(f"--warm-start {given}: no {STUDY_FILE} in it (no trial ended there)")
        trials = [t for t in load_study(folder).get_trials(deepcopy=False, states=USED)
                  if "warm_start_from" not in t.user_attrs]  # its own trials only, not what it started from
        out.append(Earlier(experiment=str(folder), trials=trials,
                           same_data=record.get("data", {}).get("fingerprint") == fingerprint))
    return out


def translate(earlier: list[Earlier], space_fn, *, seed: int = 0) -> tuple[list[optuna.trial.FrozenTrial], int]:
    """The earlier trials as trials of the current space, and how many values were dropped: each
    trial keeps the parameters the space still draws, at the value it had where the current space's
    range holds it, with the current distributions, its value (a finished trial) or its per-epoch
    scores (a stopped one), and where it came from. A trial with a choice the space no longer offers
    (a backbone not searched now), or that keeps no parameter, is left out."""
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out, dropped = [], 0
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
            drawn = {name: value for name, value in trial.params.items() if name in old.params}
            kept = {name: value for name, value in drawn.items() if old.params[name] == value
                    and distribution_holds(trial.distributions[name], value)}
            dropped += len(drawn) - len(kept)
            if not kept:
                continue
            out.append(optuna.trial.create_trial(
                params=kept, distributions={name: trial.distributions[name] for name in kept}, state=old.state,
                value=old.value if old.state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values=dict(old.intermediate_values),
                user_attrs={"warm_start_from": source.experiment, "ray_trial_id": old.user_attrs.get("ray_trial_id")},
                system_attrs={k: v for k, v in old.system_attrs.items() if k == "fixed_params"}))
    return out, dropped


def tried_backbones(trials: list[optuna.trial.FrozenTrial]) -> set[str]:
    """The backbones the trials tried: their first trials need not be swept again."""
    return {t.params["backbone"] for t in trials if "backbone" in t.params}
