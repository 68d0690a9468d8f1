"""Retraining for the final model: the top-k distinct configurations of a search, each trained
again (per seed, optionally on train+val) as a Ray task, with its validation and test predictions.

Example:
    >>> members = select_members(folder, board, metric="val_auc", top_k=3, epochs="full")
    >>> runs = retrain_all(members, data, seeds=2, refit_on_val=False, cpus=1, gpus=0)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from search.leaderboard import VAL_METRICS, clock
from trainables import UserError
from trainables.data import Dataset
from trainables.train import Training


def select_members(folder: Path, board: pd.DataFrame, *, metric: str, top_k: int, epochs: str) -> list[dict]:
    """The `top_k` best distinct configurations (identical configs count once), best first, each
    with its trial's config, the epochs to retrain and a name.

    Raises:
        UserError: no trial folder holds its configuration.
    """
    members, seen = [], set()
    for row in board.dropna(subset=[metric]).to_dict("records"):  # the leaderboard is sorted best first
        params = folder / f"trial_{row['trial_id']}" / "params.json"
        if not params.is_file():
            continue
        config = json.loads(params.read_text())
        key = json.dumps(config, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        label = config.get("recipe") or config["backbone"]
        train_epochs = int(row["best_epoch"]) if epochs == "best" else int(config["max_epochs"])
        members.append({"name": f"{len(members) + 1}-{label}-{row['trial_id']}", "trial_id": row["trial_id"],
                        "config": config, "epochs": train_epochs,
                        "search": {k: row.get(k) for k in (*VAL_METRICS, "best_epoch", "epochs", "stopped_early")}})
        if len(members) == top_k:
            break
    if not members:
        raise UserError(f"no trial folder of {folder.name} holds its params.json; is this a copy with the "
                        f"trial_<id> folders left out?")
    return members


def retrain(config: dict, data: Dataset, *, epochs: int, train: np.ndarray | None = None,
            val: np.ndarray | None = None, refit_on_val: bool = False) -> dict:
    """One final network: trained on `train` (default the train split) to `epochs`, its predictions
    on `val` (default the val split) and on test; with `refit_on_val` a second network on train+val,
    whose weights and test predictions are kept."""
    started = time.time()
    run = Training(config, data, train=train, val=val)
    history = list(run.epochs(until=epochs))
    val_probs = run.predict(run.val_x)
    if refit_on_val:
        run = Training(config, data, train=np.concatenate([data.indices("train"), data.indices("val")]))
        for _ in run.epochs(until=epochs):
            pass
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             for k, v in run.model.state_dict().items()}
    return {"history": history, "val": val_probs, "test": run.predict(data.arrays("test")[0]), "states": [state],
            "seed": run.config["seed"], "seconds": time.time() - started}


def retrain_all(members: list[dict], data: Dataset, *, seeds: int, folds: list | None, refit_on_val: bool,
                cpus: float, gpus: float) -> list[list[dict]]:
    """Every member x seed (x fold, with `folds`: the (train, held-out) index pairs of a
    cross-validated search) as a Ray task, the data put in the object store once, progress printed.
    Returns per member its runs in seed order; with folds a run holds the fold networks, the
    out-of-fold predictions over train+val (in index order) and the fold mean on test.

    Raises:
        UserError: a retraining failed (its last error line).
    """
    task = ray.remote(retrain).options(num_cpus=cpus, num_gpus=gpus, max_retries=2)
    data_ref = ray.put(data)
    parts = folds or [(None, None)]
    pending = {}
    for m, member in enumerate(members):
        for s in range(seeds):
            config = {**member["config"], "seed": int(member["config"].get("seed", 0)) + s}
            for f, (train, held_out) in enumerate(parts):
                ref = task.remote(config, data_ref, epochs=member["epochs"], train=train, val=held_out,
                                  refit_on_val=refit_on_val)
                pending[ref] = (m, s, f)
    outs = [[[None] * len(parts) for _ in range(seeds)] for _ in members]
    started, total = time.time(), len(pending)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        m, s, f = pending.pop(ref)
        try:
            outs[m][s][f] = out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise UserError(f"retraining {members[m]['name']} (seed {s}) failed: "
                            f"{str(exc.cause if hasattr(exc, 'cause') else exc).splitlines()[-1][:300]}") from None
        done, elapsed = total - len(pending), time.time() - started
        last = out["history"][-1] if out["history"] else {}
        line = (f"[{clock(elapsed)}] retrained {done}/{total}: {members[m]['name']} seed {out['seed']}"
                f"{f' fold {f + 1}/{len(parts)}' if folds else ''} in {clock(out['seconds'])}, "
                f"val_auc {last.get('val_auc', float('nan')):.4f}")
        if pending:
            line += f" | ETA ~{clock(elapsed / done * len(pending))}"
        print(line, flush=True)
    return [[_join_folds(fold_outs, folds) for fold_outs in member_outs] for member_outs in outs]


def _join_folds(outs: list[dict], folds: list | None) -> dict:
    """One run from its fold networks: out-of-fold predictions in index order, the mean on test."""
    if not folds:
        return outs[0]
    pool = np.sort(np.concatenate([held_out for _, held_out in folds]))
    oof = np.empty((len(pool), outs[0]["val"].shape[1]), np.float32)
    for (_, held_out), out in zip(folds, outs):
        oof[np.searchsorted(pool, held_out)] = out["val"]
    return {"history": outs[0]["history"], "val": oof, "test": np.mean([o["test"] for o in outs], 0),
            "states": [state for o in outs for state in o["states"]], "seed": outs[0]["seed"],
            "seconds": sum(o["seconds"] for o in outs)}
