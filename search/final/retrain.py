"""Retraining for the final model: the top-k distinct configurations of a search, each trained
again (per seed, optionally on train+val) as a Ray task, with its validation and test predictions.
The first seed of a member goes on from its trial's last checkpoint instead of starting over (not
when refit on val): the trial is the same run, so a trial that finished is only scored again. Then
the best configuration's networks train their schedule once more from half the learning rate (a
warm restart): the search ranks configurations on a short schedule, the best one ships trained longer.

Example:
    >>> found = candidates(folder, board, metric="val_auc", epochs="full", warm_restart="best")
    >>> members, failed = retrain_top(found, 3, data, seeds=2, folds=None, refit_on_val=False, cpus=1, gpus=0)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from core.formatting import clock
from core.errors import UserError
from search.engine.checkpoints import newest_readable, results
from search.engine.cores import core_budget, share_among_tasks
from search.engine.leaderboard import VAL_METRICS
from ingest.dataset import Dataset
from trainables.train import Training
from trainables.trainable import with_threads

HEARTBEAT = 60  # seconds: the longest the console stays quiet while retrainings run


def candidates(folder: Path, board: pd.DataFrame, *, metric: str, epochs: str,
               warm_restart: str = "none") -> list[dict]:
    """The distinct configurations of the search that reported `metric` and did not fail (identical
    configs count once), best first, each with its trial's config, the epochs to retrain, the
    epochs of the warm-restart cycle after them (its max epochs for the best configuration with
    `warm_restart` "best", for each with "all"; else 0) and a name.

    Raises:
        UserError: no trial folder holds its configuration.
    """
    found, seen = [], set()
    reported = board.dropna(subset=[metric])
    for row in reported[reported["status"] != "ERROR"].to_dict("records"):  # the leaderboard is sorted best first
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
        found.append({"name": f"{len(found) + 1}-{label}-{row['trial_id']}", "trial_id": row["trial_id"],
                      "config": config, "epochs": train_epochs, "trial_dir": str(params.parent),
                      "warm_restart_epochs": int(config["max_epochs"]) if warm_restart == "all" or (
                          warm_restart == "best" and not found) else 0,
                      "search": {k: row.get(k) for k in (*VAL_METRICS, "best_epoch", "epochs", "stopped_early")}})
    if not found:
        raise UserError(f"no trial folder of {folder.name} holds the params.json of a trial that reported "
                        f"{metric} without failing; is this a copy with the trial_<id> folders left out?")
    return found


def retrain_top(candidates: list[dict], top_k: int, data: Dataset, **how) -> tuple[list[dict], list[dict]]:
    """Retrain the `top_k` best candidates (`how`: the options of `retrain_all`); a candidate whose
    retraining fails is reported and skipped, and the next one takes its place. Returns the members
    (each with its `runs`) and the failures (name, error).

    Raises:
        UserError: every candidate failed.
    """
    members, failed, queue = [], [], list(candidates)
    while len(members) < top_k and queue:
        batch, queue = queue[:top_k - len(members)], queue[top_k - len(members):]
        for member, (runs, error) in zip(batch, retrain_all(batch, data, **how)):
            if error:
                failed.append({"name": member["name"], "trial_id": member["trial_id"], "error": error})
                print(f"retraining {member['name']} failed: {error}; "
                      + ("the next configuration takes its place" if queue else "no configuration is left"), flush=True)
            else:
                members.append({**member, "runs": runs})
    if not members:
        raise UserError(f"every retraining failed: {'; '.join(f['name'] + ': ' + f['error'] for f in failed)}")
    return members, failed


def retrain(config: dict, data: Dataset, *, epochs: int, warm_restart: int = 0, train: np.ndarray | None = None,
            val: np.ndarray | None = None, refit_on_val: bool = False, start: dict | None = None,
            cores=None, key: str = "") -> dict:
    """One final network: trained on `train` (default the train split) to `epochs`, then, with
    `warm_restart`, one more cycle of that many epochs from half the learning rate (see
    `Training.restart`); its predictions on `val` (default the val split) and on test. With
    `refit_on_val` a second network trained the same way on train+val, whose weights and test
    predictions are kept. `start`: a `Training.state_dict()` of this config on the same images (its
    trial's checkpoint) to go on from instead of starting over. `cores`: a `CoreBudget` whose
    `get(key)` gives the threads to use from the next epoch on (as for trials)."""
    started = time.time()
    if cores is not None:
        cores.started.remote(key, ray.util.get_node_ip_address())
    run = Training(config, data, train=train, val=val)
    if start:
        run.load_state_dict(start)
    history = list(_epochs(run, epochs, warm_restart, cores, key))
    val_probs = run.predict(run.val_x)
    if refit_on_val:
        run = Training(config, data, train=np.concatenate([data.indices("train"), data.indices("val")]))
        for _ in _epochs(run, epochs, warm_restart, cores, key):
            pass
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             for k, v in run.model.state_dict().items()}
    return {"history": history, "val": val_probs, "test": run.predict(data.arrays("test")[0]), "states": [state],
            "seed": run.config["seed"], "seconds": time.time() - started,
            "from_trial_epoch": start["epoch"] if start else 0}


def _epochs(run: Training, epochs: int, warm_restart: int, cores, key: str):
    """The run's epochs to `epochs`, then its warm-restart cycle; before each, the threads `cores` allows."""
    own = _held_cpus() or torch.get_num_threads()
    for cycle in (run.epochs(until=epochs), *([_restarted(run, warm_restart)] if warm_restart else [])):
        for metrics, threads in with_threads(cycle, cores, key, own):
            yield {**metrics, "threads": threads}


def _restarted(run: Training, epochs: int):
    run.restart(epochs)
    yield from run.epochs()


def trial_states(member: dict, folds: list | None) -> list[dict] | None:
    """The member's networks (one per fold) as its trial left them, from the newest checkpoint Ray
    registered for it that loads (`search.engine.checkpoints`), when going on from there is the same run as
    retraining: the same config (params.json not edited since), the same folds, not past the
    member's epochs. Else None (retrained from scratch)."""
    trial = Path(member.get("trial_dir", ""))
    recorded = results(trial)
    if not recorded or recorded[-1].get("config") != member["config"]:
        return None
    saved, _ = newest_readable(trial)
    if saved is None:
        return None
    states = saved["folds"]
    if len(states) != len(folds or [None]) or any(state["epoch"] > member["epochs"] for state in states):
        return None
    return states


def retrain_all(members: list[dict], data: Dataset, *, seeds: int, folds: list | None, refit_on_val: bool,
                cpus: float, gpus: float, fold_seed: int | None = None, share_idle_cores: bool = True) -> list[list[dict]]:
    """Every member x seed (x fold, with `folds`: the (train, held-out) index pairs of a
    cross-validated search, drawn with `fold_seed`) as a Ray task, the data put in the object store
    once, progress printed. The first seed goes on from its trial's checkpoint where `trial_states`
    allows (a trial that reached the member's epochs is only scored): a trial is the same run as
    its retraining. Returns per member (its runs in seed order, None) or (None, the error line of a
    failed task); with folds a run holds the fold networks, the out-of-fold predictions over
    train+val (in index order) and the fold mean on test. With `share_idle_cores` (CPU tasks only),
    once no task waits for a slot, the cores of finished tasks go to those still running."""
    task = ray.remote(retrain).options(num_cpus=cpus, num_gpus=gpus, max_retries=2)
    cores = core_budget()[1] if share_idle_cores and not gpus else None
    data_ref = ray.put(data.for_training())
    parts = folds or [(None, None)]
    pending = {}
    for m, member in enumerate(members):
        same_folds = folds is None or int(member["config"].get("seed", 0)) == fold_seed
        states = trial_states(member, folds) if same_folds and not refit_on_val else None
        if states:
            print(f"{member['name']}: going on from its trial's epoch-{states[0]['epoch']} checkpoint to epoch "
                  f"{member['epochs']} (seed {member['config'].get('seed', 0)})"
                  + (f", then {member['warm_restart_epochs']} warm-restart epochs" if member["warm_restart_epochs"] else ""),
                  flush=True)
        for s in range(seeds):
            config = {**member["config"], "seed": int(member["config"].get("seed", 0)) + s}
            for f, (train, held_out) in enumerate(parts):
                ref = task.remote(config, data_ref, epochs=member["epochs"], warm_restart=member["warm_restart_epochs"],
                                  train=train, val=held_out, refit_on_val=refit_on_val,
                                  start=states[f] if states and s == 0 else None, cores=cores, key=f"{m}-{s}-{f}")
                pending[ref] = (m, s, f)
    outs = [[[None] * len(parts) for _ in range(seeds)] for _ in members]
    errors: dict[int, str] = {}
    started, total = time.time(), len(pending)
    last_line = started
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2)
        if ready:
            ref = ready[0]
            m, s, f = pending.pop(ref)
        if cores is not None:
            share_among_tasks(cores, {"-".join(map(str, where)) for where in pending.values()}, cpus)
        if not ready:
            if time.time() - last_line >= HEARTBEAT:
                last_line = time.time()
                print(f"[{clock(last_line - started)}] retrained {total - len(pending)}/{total}, {len(pending)} in progress "
                      f"({', '.join(sorted({members[m]['name'] for m, _, _ in pending.values()}))})", flush=True)
            continue
        last_line = time.time()
        try:
            outs[m][s][f] = out = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the task raised, or its worker died (after retries)
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            errors.setdefault(m, f"seed {s}{f' fold {f + 1}' if folds else ''}: "
                                 f"{str(cause).strip().splitlines()[-1][:300]}")
            continue
        done, elapsed = total - len(pending), time.time() - started
        line = (f"[{clock(elapsed)}] retrained {done}/{total}: {members[m]['name']} seed {out['seed']}"
                f"{f' fold {f + 1}/{len(parts)}' if folds else ''} in {clock(out['seconds'])}, {outcome(out)}")
        if pending:
            line += f" | ETA ~{clock(elapsed / done * len(pending))}"
        print(line, flush=True)
    return [(None, errors[m]) if m in errors else ([_join_folds(fold_outs, folds) for fold_outs in member_outs], None)
            for m, member_outs in enumerate(outs)]


def outcome(run: dict) -> str:
    """How a retraining ended, for its progress line: its last epoch's validation AUC, or, for a
    trial's network that was only scored, which epoch it was kept at."""
    if not run["history"]:
        return f"kept as its trial left it (epoch {run['from_trial_epoch']})"
    return f"val_auc {run['history'][-1]['val_auc']:.4f}"


def _held_cpus() -> int:
    """The CPUs this Ray task holds (not torch's default, which a set OMP_NUM_THREADS would decide); 0
    when called outside a task."""
    try:
        return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except AssertionError:  # Ray's answer in the driver
        return 0


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
            "seconds": sum(o["seconds"] for o in outs),
            "from_trial_epoch": min(o.get("from_trial_epoch", 0) for o in outs)}
