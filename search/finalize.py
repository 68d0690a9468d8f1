"""Finalize a search: retrain its best configurations, assemble the top-k ensemble, and report
on the test split that the search never saw.

    python -m search.finalize --experiment experiments/backbones-20261123-0100
    python -m search.finalize --experiment experiments/recipes-x --top-k 5 --seeds 3 --positive-class COVID

`python -m search.run` runs this at its end unless given `--no-finalize`; it also works on an
interrupted search (it uses the trials that reported). Writes `<experiment>/final/`:
`metrics.json`, `test_predictions.csv`, `val_predictions.csv`, `report.md`, the plots
`roc.png`, `confusion_matrix.png`, `training_curves.png`, `search_progress.png`, and the model
directories `ensemble/` (the chosen final model, what `python -m search.predict` loads) and
`members/<name>/`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from trainables import UserError

METRIC_MODES = {"val_auc": "max", "val_acc": "max", "val_f1": "max", "val_loss": "min"}


@dataclass
class FinalizeOptions:
    """Every option of a finalize run, as plain data (recorded in metrics.json)."""

    experiment: str
    top_k: int = 3
    seeds: int = 1
    epochs: str = "full"  # "full": the config's max_epochs; "best": the best epoch its trial found
    refit_on_val: bool = False
    positive_class: str | None = None
    bootstrap: int = 1000
    data: str | None = None  # where the search's data is now, when it moved
    address: str | None = None
    cpus_per_model: float | None = None
    gpus_per_model: float | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.finalize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment", required=True, help="the search's folder: <storage>/<name>")
    add_finalize_flags(p)
    p.add_argument("--epochs", default="full", choices=["full", "best"],
                   help="retrain to the config's max epochs, or to the best epoch its trial found")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--data", help="the search's data, if it moved since (checked by fingerprint)")
    p.add_argument("--address", help="join a running Ray cluster: auto, or the head's host:6379")
    p.add_argument("--cpus-per-model", type=float, help="CPUs per retraining (default: the search's per trial)")
    p.add_argument("--gpus-per-model", type=float, help="GPUs per retraining (default: the search's per trial)")
    return p


def add_finalize_flags(p: argparse.ArgumentParser) -> None:
    """The flags `search.run` shares with `search.finalize`."""
    p.add_argument("--top-k", type=int, default=3, help="distinct best configurations to retrain and ensemble")
    p.add_argument("--seeds", type=int, default=1, help="retrainings of each configuration, with seeds "
                                                        "seed, seed+1, ...; a member averages them")
    p.add_argument("--refit-on-val", action="store_true",
                   help="also retrain on train+val for the saved models (threshold and ensemble weights "
                        "still come from validation predictions of the train-only models)")
    p.add_argument("--positive-class", help="class the threshold, sensitivity and specificity are for "
                                            "(default: the COVID class, or the abnormal one of two)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = FinalizeOptions(**{f.name: getattr(args, f.name) for f in fields(FinalizeOptions)})
    try:
        finalize(options)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def check_options(o: FinalizeOptions) -> None:
    for key in ("top_k", "seeds", "bootstrap"):
        if getattr(o, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(o, key)}")
    if o.epochs not in ("full", "best"):
        raise UserError(f"epochs must be 'full' or 'best', got {o.epochs!r}")
    for key in ("cpus_per_model", "gpus_per_model"):
        value = getattr(o, key)
        if value is not None and value < 0 or (key == "cpus_per_model" and value == 0):
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {value}")


def finalize(options: FinalizeOptions, *, data=None) -> Path:
    """Retrain, ensemble, evaluate and report; returns `<experiment>/final`.

    `data` is the search's loaded Dataset when called from `search.run` (else it is loaded again
    and checked against the search's fingerprint).

    Example:
        >>> finalize(FinalizeOptions(experiment="experiments/backbones-20261123-0100", seeds=3))

    Raises:
        UserError: not an experiment, no trial that reported, data changed, bad options.
    """
    import ray

    from search.evaluate import positive_class

    check_options(options)
    folder = Path(options.experiment).expanduser().resolve()
    record = _search_record(folder)
    search = record["options"]
    metric = search["metric"]
    board = _leaderboard(folder, metric)
    if data is None:
        data = _load_data(record, options.data)
    positive = positive_class(data.class_names, options.positive_class)
    members = select_members(folder, board, metric=metric, top_k=options.top_k, epochs=options.epochs)

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="ERROR")
    try:
        cpus = options.cpus_per_model or search.get("cpus_per_trial") or 1
        gpus = options.gpus_per_model if options.gpus_per_model is not None else (search.get("gpus_per_trial") or 0)
        _check_resources(cpus, gpus, cluster=bool(options.address))
        print(f"finalize: retraining {len(members)} configuration(s) x {options.seeds} seed(s) "
              f"({'train+val' if options.refit_on_val else 'train'}, {options.epochs} epochs), "
              f"{cpus:g} CPU / {gpus:g} GPU each", flush=True)
        results = _retrain_all(members, data, seeds=options.seeds, refit_on_val=options.refit_on_val,
                               cpus=cpus, gpus=gpus)
    finally:
        if own_ray:
            ray.shutdown()
    for member, runs in zip(members, results):
        member["runs"] = runs

    from search.report import write_final
    return write_final(folder, options=options, record=record, board=board, data=data, members=members,
                       positive=positive, metric=metric, mode=METRIC_MODES[metric])


# ---- choosing what to retrain -------------------------------------------------------------------

def _search_record(folder: Path) -> dict:
    path = folder / "search_config.json"
    if not folder.is_dir():
        raise UserError(f"experiment folder {folder} does not exist")
    if not path.is_file():
        raise UserError(f"{folder} is not an experiment folder (no search_config.json); pass the folder "
                        f"python -m search.run printed as 'experiment:'")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _leaderboard(folder: Path, metric: str) -> pd.DataFrame:
    path = folder / "leaderboard.csv"
    board = pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()
    if board.empty or metric not in board or board[metric].notna().sum() == 0:
        raise UserError(f"no trial of {folder.name} has reported {metric} yet: nothing to finalize "
                        f"(continue the search with --resume, or wait for a trial to finish an epoch)")
    return board


def _load_data(record: dict, moved_to: str | None):
    from trainables.data import load_dataset
    o = record["options"]
    path = moved_to or o["data"]
    if not path:
        raise UserError("the search's data path is not recorded; pass --data")
    if not Path(path).expanduser().exists():
        raise UserError(f"the search's data {path!r} is not there any more; pass --data with where it is now")
    data = load_dataset(path, image_size=o["image_size"], channels=o["channels"], seed=o["seed"],
                        group_column=o.get("group_column"), skip_corrupt=o.get("skip_corrupt", False),
                        subset=o.get("subset"))
    if data.fingerprint != record["data"]["fingerprint"]:
        raise UserError(f"the data at {path} is not the data the search ran on (fingerprint "
                        f"{record['data']['fingerprint']}, now {data.fingerprint})")
    if o.get("dedupe"):
        from search.run import audited
        data, _ = audited(data, dedupe=True)
    return data


def select_members(folder: Path, board: pd.DataFrame, *, metric: str, top_k: int, epochs: str) -> list[dict]:
    """The `top_k` best distinct configurations (identical configs count once), best first, each
    with its trial's config, the epochs to retrain and a name."""
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
                        "config": config, "epochs": train_epochs, "search": {
                            m: row.get(m) for m in ("val_auc", "val_acc", "val_f1", "val_loss", "best_epoch",
                                                    "epochs", "stopped_early")}})
        if len(members) == top_k:
            break
    if not members:
        raise UserError(f"no trial folder of {folder.name} holds its params.json; is this a copy with the "
                        f"trial_<id> folders left out?")
    return members


# ---- retraining ----------------------------------------------------------------------------------

def retrain(config: dict, data, *, epochs: int, refit_on_val: bool) -> dict:
    """One final network: trained on train to `epochs` (validation predictions come from it); with
    `refit_on_val` a second one on train+val, whose weights and test predictions are kept."""
    import torch

    from trainables.train import Training
    started = time.time()
    run = Training(config, data)
    history = list(run.epochs(until=epochs))
    val = run.predict(data.arrays("val")[0])
    if refit_on_val:
        run = Training(config, data, train_splits=("train", "val"))
        for _ in run.epochs(until=epochs):
            pass
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             for k, v in run.model.state_dict().items()}
    return {"history": history, "val": val, "test": run.predict(data.arrays("test")[0]), "state": state,
            "seed": run.config["seed"], "seconds": time.time() - started}


def _retrain_all(members: list[dict], data, *, seeds: int, refit_on_val: bool, cpus: float,
                 gpus: float) -> list[list[dict]]:
    """Every member x seed as a Ray task (the data put in the object store once); progress printed."""
    import ray

    from search.leaderboard import _clock
    task = ray.remote(retrain).options(num_cpus=cpus, num_gpus=gpus, max_retries=2)
    data_ref = ray.put(data)
    pending = {}
    for m, member in enumerate(members):
        for s in range(seeds):
            config = {**member["config"], "seed": int(member["config"].get("seed", 0)) + s}
            ref = task.remote(config, data_ref, epochs=member["epochs"], refit_on_val=refit_on_val)
            pending[ref] = (m, s)
    results = [[None] * seeds for _ in members]
    started, total = time.time(), len(pending)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        m, s = pending.pop(ref)
        try:
            results[m][s] = out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise UserError(f"retraining {members[m]['name']} (seed {s}) failed: "
                            f"{str(exc.cause if hasattr(exc, 'cause') else exc).splitlines()[-1][:300]}") from None
        done, elapsed = total - len(pending), time.time() - started
        last = out["history"][-1] if out["history"] else {}
        line = (f"[{_clock(elapsed)}] retrained {done}/{total}: {members[m]['name']} seed {out['seed']} in "
                f"{_clock(out['seconds'])}, val_auc {last.get('val_auc', float('nan')):.4f}")
        if pending:
            line += f" | ETA ~{_clock(elapsed / done * len(pending))}"
        print(line, flush=True)
    return results


def _check_resources(cpus: float, gpus: float, *, cluster: bool) -> None:
    import ray
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        have = "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}" for r in nodes)
        if cluster:  # the autoscaler adds nodes for tasks that wait
            print(f"warning: no node can retrain a model with {cpus:g} CPU and {gpus:g} GPU yet (nodes: {have})")
            return
        raise UserError(f"no node can retrain a model with {cpus:g} CPU and {gpus:g} GPU (nodes: {have}); "
                        f"pass --cpus-per-model / --gpus-per-model")


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
    from search.evaluate import score
    loss = score(labels, probs, "val_loss")
    primary = score(labels, probs, metric)
    return (-primary if METRIC_MODES[metric] == "min" else primary, -loss)


if __name__ == "__main__":
    sys.exit(main())
