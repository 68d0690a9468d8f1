"""The default command on the shared data sets: `python -m search.run --space backbones --data <set>
--weights random`, search and finalize, with nothing else set. Per run: the wall time, the final
model's test figures, how the search selected (one validation split or K folds), whether every
backbone was tried, and what the sampler heard (PRUNED / COMPLETE trials, and whether every
stopped trial reached Optuna with its score at the epoch it stopped). Each CT set is also tested on
the other (`--external`, issue 51): their final models' figures on data from elsewhere.

    python -m bench.default_runs                                        # the four data sets, seed 0
    python -m bench.default_runs --datasets covid19-xray-3class --seeds 0,1,2 --folds 1,auto

`--seeds` and `--folds` make a grid (the seed studies of selection: one validation split against
cross-validation). Prints the table, writes bench/results/default_runs-<stamp>.csv row by row as runs
land (each row with its commit, CPU and versions), and with `--benchmarks` adds it to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {"pneumoniamnist": "pneumoniamnist/pneumoniamnist.npz", "sarscov2-ct": "sarscov2-ct",
            "covid-ct-ucsd": "covid-ct-ucsd/patients.csv", "covid19-xray-3class": "covid19-xray-3class"}
EXTERNAL = {"sarscov2-ct": "covid-ct-ucsd", "covid-ct-ucsd": "sarscov2-ct"}  # the same task from elsewhere


def sampler_heard(folder: Path, board: pd.DataFrame) -> dict:
    """PRUNED / COMPLETE counts of the kept study, and whether every ASHA-stopped trial holds its
    score at the epoch it stopped."""
    from search.engine.tuner import load_study
    study = {t.user_attrs.get("ray_trial_id"): t for t in load_study(folder).trials}
    stopped = board[board["stopped_early"]]
    heard = all(row["epochs"] in study[row["trial_id"]].intermediate_values for row in stopped.to_dict("records"))
    states = pd.Series([t.state.name for t in study.values()]).value_counts()
    return {"PRUNED": int(states.get("PRUNED", 0)), "COMPLETE": int(states.get("COMPLETE", 0)),
            "stopped trials heard at their last epoch": f"{heard} ({len(stopped)})"}


def _calibration(calibration: dict) -> str:
    return (f"{calibration['before']['ece']:.4f} -> {calibration['ece']:.4f} (T {calibration['temperature']:.3f}, "
            f"fitted {calibration['fitted_temperature']:.3f})")


def run(name: str, seed: int, folds: str, args) -> dict:
    from search.run import run_search
    from search.options import SearchOptions
    started = time.time()
    external = [str(Path(args.shared) / DATASETS[EXTERNAL[name]])] if args.external and name in EXTERNAL else None
    folder = run_search(SearchOptions(space="backbones", data=str(Path(args.shared) / DATASETS[name]), weights="random",
                                      seed=seed, folds=folds if folds == "auto" else int(folds), storage=args.storage,
                                      name=f"{name}-seed{seed}-folds{folds}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      external=external))
    wall = time.time() - started
    record = json.loads((folder / "search_config.json").read_text())
    metrics = json.loads((folder / "final" / "metrics.json").read_text())
    board = pd.read_csv(folder / "leaderboard.csv")
    final = metrics["models"][metrics["chosen"]]["test"]
    tried = set(board["backbone"])
    return {"data set": name, "seed": seed, "--folds": folds, "selection": metrics["selection"]["where"],
            "final model": metrics["chosen"], "test AUC (95% CI)": f"{final['auc']:.3f} ({final['ci']['auc'][0]:.3f}-"
                                                                      f"{final['ci']['auc'][1]:.3f})",
            "accuracy": f"{final['accuracy']:.3f}", "trials": len(board),
            "backbones tried": f"{len(tried & set(record['backbones']))}/{len(record['backbones'])}",
            "test ECE before -> after scaling (T)": _calibration(metrics["models"][metrics["chosen"]]["calibration"]),
            **sampler_heard(folder, board), **_external(metrics.get("external") or []),
            "wall (search + finalize)": common.clock(wall), "experiment": folder.name}


def _external(found: list[dict]) -> dict:
    """The final model on the other CT set: its figures and the drop from the internal test."""
    if not found:
        return {}
    e = found[0]
    return {"external set": e["name"], "external AUC (95% CI)": f"{e['auc']:.3f} ({e['ci']['auc'][0]:.3f}-"
                                                               f"{e['ci']['auc'][1]:.3f})",
            "external accuracy": f"{e['accuracy']:.3f}",
            "external sensitivity / specificity": " / ".join("n/a" if e[k] is None else f"{e[k]:.3f}"
                                                             for k in ("sensitivity", "specificity")),
            "AUC drop": f"{e['drop']['auc']:.3f}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated: {', '.join(DATASETS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--folds", default="auto", help="comma-separated --folds values (auto, 1, 5, ...)")
    p.add_argument("--shared", default=str(common.SHARED), help="the shared data folder")
    p.add_argument("--storage", default=str(ROOT / "experiments" / "default-runs"))
    p.add_argument("--no-external", dest="external", action="store_false",
                   help="do not test each CT set's final model on the other")
    p.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted changes (rows marked)")
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown data set(s) {unknown}; choose from {', '.join(DATASETS)}")
    if not Path(args.shared).is_dir():
        p.error(f"--shared {args.shared}: no such folder (the shared data; or set SHARED_DATA)")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: comma-separated whole numbers")
    folds = [f.strip() for f in args.folds.split(",") if f.strip()]
    if any(f != "auto" and not f.isdigit() for f in folds):
        p.error(f"--folds {args.folds!r}: comma-separated 'auto' or whole numbers")
    provenance, started, csv, rows = common.provenance(allow_dirty=args.allow_dirty), time.time(), \
        common.results_csv("default_runs"), []
    for name in names:
        for f in folds:
            for seed in seeds:
                rows.append({**run(name, seed, f, args), **provenance})
                pd.DataFrame(rows).to_csv(csv, index=False)
                print(rows[-1], flush=True)
    common.finish("default_runs", pd.DataFrame(rows), started=started, benchmarks=args.benchmarks, csv=csv,
                  settings="the default command (CPU profile, --weights random), search + finalize; each CT set's "
                           "final model also tested on the other (--external)",
                  section="Default runs (issue 15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
