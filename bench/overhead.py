"""Overhead: where a search's wall time goes. Runs the default CPU search (no finalize) and splits
`trial slots x wall time` into training steps, evaluation steps, the rest of each trial (model
build, checkpoint, report), Ray's scheduling and idle slots, and what happens before and after
`Tuner.fit` (Ray start, data load and audit, leaderboard and plots).

    python -m bench.overhead                       # the default search on PneumoniaMNIST
    python -m bench.overhead --num-samples 8 --max-epochs 4

Reads the experiment's `timings.json` and each trial's `result.json` (the trainable reports its own
`train_seconds` and `eval_seconds` every epoch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def trial_results(folder: Path) -> dict[str, list[dict]]:
    """Every epoch each trial reported, by trial folder name."""
    return {d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
            for d in sorted(folder.glob("trial_*")) if (d / "result.json").exists()}


def breakdown(folder: Path) -> tuple[pd.DataFrame, dict]:
    timings = json.loads((folder / "timings.json").read_text())
    record = json.loads((folder / "search_config.json").read_text())
    slots = timings["trial_slots"]
    results = trial_results(folder)
    epochs = [r for rs in results.values() for r in rs]
    # an epoch run on shared idle cores (search/engine/cores.py) held `threads` slots instead of one
    train = sum(r["train_seconds"] * r.get("threads", 1) for r in epochs)
    evaluate = sum(r["eval_seconds"] * r.get("threads", 1) for r in epochs)
    in_trials = sum(rs[-1]["time_total_s"] + sum(r["time_this_iter_s"] * (r.get("threads", 1) - 1) for r in rs)
                    for rs in results.values())
    wall = timings["search_seconds"]
    fit = timings["fit_seconds"]
    parts = {
        "training steps": train,
        "evaluation steps": evaluate,
        "rest of each trial (model build, checkpoint, report)": in_trials - train - evaluate,
        "Ray scheduling, trial start-up and idle slots during fit": slots * fit - in_trials,
        "before fit (Ray start, data load, audit, checks)": slots * timings["before_fit_seconds"],
        "after fit (Optuna export, plots, summary)": slots * (wall - fit - timings["before_fit_seconds"]),
    }
    table = pd.DataFrame([{"component": k, "slot-seconds": round(v, 1), "share": f"{v / (slots * wall):.1%}"}
                          for k, v in parts.items()])
    per_trial = [sum(r["train_seconds"] + r["eval_seconds"] for r in rs) / max(rs[-1]["time_total_s"], 1e-9)
                 for rs in results.values()]
    summary = {"wall": wall, "slots": slots, "trials": len(results), "trial_epochs": len(epochs),
               "epochs_on_shared_cores": sum(r.get("threads", 1) > 1 for r in epochs),
               "in_steps_share": (train + evaluate) / (slots * wall),
               "in_steps_share_of_fit": (train + evaluate) / (slots * fit),
               "per_trial_median_share": statistics.median(per_trial), "per_trial_min_share": min(per_trial),
               "space": record["space"], "backbones": record["backbones"]}
    return table, summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=common.default_data())
    p.add_argument("--space", default="backbones")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--time-budget", type=float)
    p.add_argument("--profile", default="auto")
    p.add_argument("--weights", default="random", choices=["imagenet", "random"])
    p.add_argument("--storage", default="/tmp/bench-overhead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", help="analyse this finished experiment instead of running one")
    p.add_argument("--no-share-idle-cores", dest="share_idle_cores", action="store_false",
                   help="keep every trial at its own CPUs (the search's --no-share-idle-cores), to compare")
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    started = time.time()
    if args.experiment:
        folder = Path(args.experiment)
        if not (folder / "timings.json").exists():
            p.error(f"--experiment {folder}: no timings.json there (not a finished search of this version)")
    else:
        from search.run import run_search
        from search.options import SearchOptions
        folder = run_search(SearchOptions(space=args.space, data=args.data, weights=args.weights, finalize=False,
                                          num_samples=args.num_samples, max_epochs=args.max_epochs,
                                          time_budget=args.time_budget, profile=args.profile,
                                          storage=args.storage, seed=args.seed, share_idle_cores=args.share_idle_cores,
                                          name=f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"))
    table, s = breakdown(folder)
    per_trial = pd.DataFrame([{"component": "per trial: time in steps / trial wall (median, min)", "slot-seconds": "",
                               "share": f"{s['per_trial_median_share']:.1%}, {s['per_trial_min_share']:.1%}"},
                              {"component": "total: time in steps / (slots x search wall)", "slot-seconds": "",
                               "share": f"{s['in_steps_share']:.1%} (target >= 90%)"},
                              {"component": "during fit: time in steps / (slots x fit wall)", "slot-seconds": "",
                               "share": f"{s['in_steps_share_of_fit']:.1%}"}])
    table = pd.concat([table, per_trial], ignore_index=True)
    settings = (f"{folder.name}: {s['trials']} trials, {s['trial_epochs']} trial-epochs "
                f"({s['epochs_on_shared_cores']} on shared idle cores), {s['slots']} slots, "
                f"search wall {common.clock(s['wall'])} (Ray start to summary; finalize not counted), space {s['space']}")
    common.finish("overhead", table, settings=settings, started=started, benchmarks=args.benchmarks,
                  section="Overhead (issue 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
