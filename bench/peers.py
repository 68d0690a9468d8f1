"""Search against what a user would otherwise do, at the same wall-time budget: (a) this system's
`backbones` search (TPE + ASHA on Ray Tune), (b) the best classic recipe of `recipes`, (c) Optuna
alone (TPE + successive-halving pruner, one process, no Ray), (d) random search on Ray Tune with no
scheduler. Each arm's best trial by validation AUC, and that trial's model on the test split.

    python -m bench.peers                          # CPU: 300 s per arm on PneumoniaMNIST
    python -m bench.peers --budget 1800 --profile gpu --image-size 224

Test AUC is the best trial's model at its last epoch (a search keeps one checkpoint per trial), so
it is the same measurement for every arm; no arm saw the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def test_auc(run, data) -> float:
    from trainables.metrics import classification_metrics
    images, labels = data.arrays("test")
    return float(classification_metrics(labels, run.predict(images))["auc"])


def tune_arm(label: str, options, data) -> dict:
    """Run a search (no finalize) and evaluate its best trial's last checkpoint on test."""
    from search.engine.checkpoints import newest_readable
    from search.run import run_search
    from trainables.train import Training
    started = time.time()
    folder = run_search(options)
    wall = time.time() - started
    board = pd.read_csv(folder / "leaderboard.csv").dropna(subset=["val_auc"])
    if board.empty:
        raise SystemExit(f"error: no trial of {label} finished an epoch within the budget; raise --budget")
    best = board.iloc[0]
    trial = folder / f"trial_{best['trial_id']}"
    run = Training(json.loads((trial / "params.json").read_text()), data)
    saved, _ = newest_readable(trial)
    if saved is None:
        raise SystemExit(f"error: the best trial {best['trial_id']} of {label} has no readable checkpoint")
    run.load_state_dict(saved["folds"][0])
    return {"arm": label, "trials": len(board), "trial-epochs": int(board["epochs"].sum()),
            "best val AUC": round(float(best["val_auc"]), 4), "its test AUC": round(test_auc(run, data), 4),
            "best trial": f"{best.get('recipe') if isinstance(best.get('recipe'), str) else best['backbone']}",
            "wall": common.clock(wall)}


def optuna_arm(data, *, budget: float, seed: int, base: dict, pruner: str) -> dict:
    """TPE + a pruner in one process: what a user writes with Optuna and no Ray."""
    import optuna
    import torch

    from spaces import get_space
    from trainables.models import num_stages
    from trainables.train import Training
    torch.set_num_threads(os.cpu_count() or 1)
    space = get_space("backbones")
    backbones = space.cpu_backbones
    stages = {b: num_stages(b) for b in backbones}
    pruners = {"sha": optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
               "median": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)}
    study = optuna.create_study(direction="maximize", pruner=pruners[pruner],
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True))
    started = time.time()
    deadline = started + budget
    epochs = [0]

    def objective(trial):
        config = {**base, **space.sample(trial, backbones=backbones, stages=stages, pretrained=False)}
        run = Training(config, data)
        best = float("-inf")
        for metrics in run.epochs():
            epochs[0] += 1
            best = max(best, metrics["val_auc"])
            trial.report(metrics["val_auc"], metrics["epoch"])
            if trial.should_prune() or time.time() > deadline:
                trial.set_user_attr("test_auc", test_auc(run, data))
                trial.set_user_attr("best_val", best)
                raise optuna.TrialPruned()
        trial.set_user_attr("test_auc", test_auc(run, data))
        trial.set_user_attr("best_val", best)
        return best

    study.optimize(objective, timeout=budget)
    done = [t for t in study.trials if "best_val" in t.user_attrs]
    best = max(done, key=lambda t: t.user_attrs["best_val"])
    return {"arm": f"Optuna alone (TPE + {pruner} pruner, 1 process)", "trials": len(done), "trial-epochs": epochs[0],
            "best val AUC": round(best.user_attrs["best_val"], 4), "its test AUC": round(best.user_attrs["test_auc"], 4),
            "best trial": best.params["backbone"], "wall": common.clock(time.time() - started)}


ARMS = ("backbones", "recipes", "optuna", "random")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=common.default_data())
    p.add_argument("--budget", type=float, default=300, help="wall seconds of searching per arm")
    p.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--image-size", type=int, help="override the profile's image size")
    p.add_argument("--max-epochs", type=int, help="override the profile's epochs per trial")
    p.add_argument("--weights", default="random", choices=["imagenet", "random"])
    p.add_argument("--pruner", default="sha", choices=["sha", "median"], help="Optuna-alone pruner")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms: {', '.join(ARMS)}")
    p.add_argument("--storage", default="/tmp/bench-peers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    from search.options import PROFILES, SearchOptions, resolve_batch_size
    from ingest.dataset import load_dataset
    profile = PROFILES[args.profile]
    size = args.image_size or profile["image_size"]
    max_epochs = args.max_epochs or profile["max_epochs"]
    started = time.time()
    data = load_dataset(args.data, image_size=size, channels=1, seed=args.seed)
    size = int(data.images.shape[1])  # the profile's "auto" resolved
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common_options = dict(data=args.data, profile=args.profile, image_size=size, max_epochs=max_epochs,
                          weights=args.weights, seed=args.seed, storage=args.storage, finalize=False,
                          time_budget=args.budget)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        p.error(f"unknown arm(s) {unknown or args.arms!r}; choose from {', '.join(ARMS)}")
    rows = []
    if "backbones" in arms:
        rows.append(tune_arm("backbones search (TPE + ASHA, Ray Tune)", SearchOptions(
            space="backbones", name=f"backbones-{stamp}", **common_options), data))
    if "recipes" in arms:
        rows.append(tune_arm("best classic recipe (recipes)", SearchOptions(
            space="recipes", name=f"recipes-{stamp}", **common_options), data))
    if "optuna" in arms:
        rows.append(optuna_arm(data, budget=args.budget, seed=args.seed, pruner=args.pruner,
                               base={"image_size": size, "max_epochs": max_epochs,
                                     "batch_size": resolve_batch_size(profile["batch_size"], len(data.indices("train"))),
                                     "seed": args.seed, "weights": args.weights}))
    if "random" in arms:
        rows.append(tune_arm("random search (Ray Tune, no scheduler)", SearchOptions(
            space="backbones", name=f"random-{stamp}", sampler="random", scheduler="fifo", **common_options), data))
    for row in rows:
        print(row, flush=True)
    settings = (f"{Path(args.data).name}, {args.budget:.0f} s of search per arm, {args.profile} profile, {size} px, "
                f"max {max_epochs} epochs per trial, weights {args.weights}, seed {args.seed}")
    common.finish("peers", pd.DataFrame(rows), settings=settings, started=started, benchmarks=args.benchmarks,
                  section="Search vs recipes vs peers (issue 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
