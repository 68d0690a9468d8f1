"""ASHA against FIFO: the same space, sampler, seed and number of trials, with and without early
stopping. Reports the trial-epochs and wall time each spent, and the compute each needed to first
reach the FIFO run's final best validation AUC.

    python -m bench.asha_vs_fifo                                   # CPU: 12 trials x 8 epochs
    python -m bench.asha_vs_fifo --profile gpu --num-samples 32 --max-epochs 30

"Compute to reach" counts the trial-epochs (and wall seconds) spent, in the order the epochs
finished, until some trial first reported a validation AUC at least FIFO's best.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from bench import common
from bench.overhead import trial_results

ROOT = Path(__file__).resolve().parents[1]


def epochs_in_order(folder: Path) -> pd.DataFrame:
    """Every trial-epoch of an experiment, in the order they finished."""
    rows = [{"trial": t, "epoch": r["training_iteration"], "val_auc": r["val_auc"],
             "finished": r["timestamp"]}
            for t, rs in trial_results(folder).items() for r in rs]
    frame = pd.DataFrame(rows).sort_values("finished", kind="stable").reset_index(drop=True)
    frame["trial_epochs"] = range(1, len(frame) + 1)
    return frame


def reach(frame: pd.DataFrame, target: float, started: float) -> tuple[int | None, float | None]:
    hit = frame[frame["val_auc"] >= target - 1e-12]
    if hit.empty:
        return None, None
    first = hit.iloc[0]
    return int(first["trial_epochs"]), float(first["finished"] - started)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=common.default_data())
    p.add_argument("--space", default="backbones")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--profile", default="auto")
    p.add_argument("--weights", default="random", choices=["imagenet", "random"])
    p.add_argument("--storage", default="/tmp/bench-asha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    from search.run import run_search
    from search.options import SearchOptions
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {}
    for scheduler in ("fifo", "asha"):
        folder = run_search(SearchOptions(
            space=args.space, data=args.data, weights=args.weights, finalize=False, scheduler=scheduler,
            num_samples=args.num_samples, max_epochs=args.max_epochs, sampler=args.sampler, profile=args.profile,
            seed=args.seed, storage=args.storage, name=f"{scheduler}-{stamp}", time_budget=1e9))
        timings = json.loads((folder / "timings.json").read_text())
        runs[scheduler] = (folder, epochs_in_order(folder), timings)
    target = runs["fifo"][1]["val_auc"].max()
    rows = []
    for scheduler, (folder, frame, timings) in runs.items():
        epochs, seconds = reach(frame, target, timings["fit_started"])
        board = pd.read_csv(folder / "leaderboard.csv")
        rows.append({"scheduler": scheduler.upper(), "trials": len(board), "trial-epochs": len(frame),
                     "search wall (fit)": common.clock(timings["fit_seconds"]),
                     "best val AUC": round(frame["val_auc"].max(), 4),
                     "stopped early": int(board["stopped_early"].sum()),
                     "trial-epochs to reach FIFO's best": epochs if epochs else "not reached",
                     "wall to reach FIFO's best": common.clock(seconds) if seconds is not None else "not reached"})
    fifo, asha = rows
    if isinstance(asha["trial-epochs to reach FIFO's best"], int):
        share = asha["trial-epochs to reach FIFO's best"] / fifo["trial-epochs"]
        verdict = f"ASHA reached FIFO's best with {share:.0%} of FIFO's trial-epochs (target <= 33%)"
    else:
        verdict = (f"ASHA did not reach FIFO's best ({target:.4f}); its own best was {asha['best val AUC']} with "
                   f"{asha['trial-epochs'] / fifo['trial-epochs']:.0%} of FIFO's trial-epochs")
    print(verdict)
    settings = (f"space {args.space}, sampler {args.sampler}, {args.num_samples} trials x {args.max_epochs} epochs, "
                f"seed {args.seed}, weights {args.weights}; FIFO's best val AUC {target:.4f}. {verdict}")
    common.finish("asha_vs_fifo", pd.DataFrame(rows), settings=settings, started=started,
                  benchmarks=args.benchmarks, section="ASHA vs FIFO (issue 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
