"""What the search adds over a backbone sweep (issue 30): per seed, five arms on the same data and
machine, each finalized the same cheap way (`--top-k 1 --warm-restart none`) so that they differ
only in their search.

    python -m bench.search_value --seeds 0,1,2 --benchmarks        # ~5 hours on 2 cores, ~45 GB of checkpoints

- `sweep`: the first trials alone (one per backbone at the plain recipe), at the default budget;
- `default`: the default search at the default budget (the cpu profile's 900 s);
- `default-3x`: the default search at three times the budget (and three times the trials);
- `random-3x`: random search with ASHA at three times the budget;
- `warm`: the default search at the default budget, warm-started from the previous seed's
  `default` search (seed 1 from seed 0, ..., seed 0 from the last).

Each arm is one `python -m search.run` command, run one at a time: the arms are budget-bound, and a
second job on the cores would change what they can do. Every trial's checkpoint is kept (for
`bench/selection_rules.py`, which scores each trial on test). An arm whose `final/metrics.json` exists under
`--work` is read, not run again, so a measurement cut short goes on where it stopped. Per arm and seed:
the trials, those the sampler proposed (not enqueued at fixed values), the best validation AUC, the
final model's test AUC (with its bootstrap interval) and accuracy, and the wall time; then the mean
and spread over seeds per arm.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]

ARMS = ("default", "warm", "sweep", "default-3x", "random-3x")  # the order they run in: the warm arm needs the default


def arm_flags(arm: str, seed: int, seeds: list[int], *, budget: float, samples: int, first: int, work: Path) -> list[str]:
    if arm == "sweep":
        return ["--num-samples", str(first), "--time-budget", str(budget)]
    if arm == "warm":
        earlier = seeds[(seeds.index(seed) - 1) % len(seeds)]
        return ["--time-budget", str(budget), "--num-samples", str(samples),
                "--warm-start", str(work / f"default-seed{earlier}")]
    scale = 3 if arm.endswith("3x") else 1
    flags = ["--time-budget", str(scale * budget), "--num-samples", str(scale * samples)]
    return flags + (["--sampler", "random"] if arm.startswith("random") else [])


def run_arm(arm: str, seed: int, flags: list[str], args, work: Path) -> Path:
    folder = work / f"{arm}-seed{seed}"
    if (folder / "final" / "metrics.json").is_file():
        return folder
    common.run_search(folder, ["--space", args.space, "--data", args.data, "--weights", "random", "--seed", str(seed),
                               "--top-k", "1", "--warm-restart", "none", "--keep-checkpoints", "all", *flags, *args.extra],
                      f"{arm} seed {seed}")
    return folder


def measure(folder: Path, arm: str, seed: int) -> dict:
    from search.engine.tuner import load_study
    board = pd.read_csv(folder / "leaderboard.csv")
    own = [t for t in load_study(folder).trials if "warm_start_from" not in t.user_attrs]
    metrics = json.loads((folder / "final" / "metrics.json").read_text())
    test = metrics["models"][metrics["chosen"]]["test"]
    timings = json.loads((folder / "timings.json").read_text())
    started_from = json.loads((folder / "search_config.json").read_text()).get("warm_start", {}).get("from", [])
    if started_from:
        arm += " (from " + ", ".join(Path(e["experiment"]).name.replace("default-", "").replace("seed", "seed ")
                                     for e in started_from) + ")"
    return {"arm": arm, "seed": seed, "trials": len(board),
            "proposed": sum("fixed_params" not in t.system_attrs for t in own),
            "best_val_auc": round(float(board["val_auc"].max()), 4), "test_auc": round(test["auc"], 4),
            "test_auc_ci": f"{test['ci']['auc'][0]:.3f}-{test['ci']['auc'][1]:.3f}",
            "test_acc": round(test["accuracy"], 4), "final_backbone": metrics["models"][metrics["chosen"]]["config"]["backbone"],
            "wall_min": round((timings["ended"] - timings["started"]) / 60, 1),
            "search_s": round(timings["search_seconds"]),
            "stop": (timings.get("stop_rule") or {}).get("bound") or ("" if (timings.get("stop_rule") or {}).get("on") else "off")}


def summary(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for arm, group in table.groupby(table["arm"].str.split(" ").str[0], sort=False):
        row = {"arm": arm, "seed": "mean (sd)", "trials": f"{group['trials'].mean():.1f}",
               "proposed": f"{group['proposed'].mean():.1f}", "test_auc_ci": "",
               "final_backbone": ", ".join(sorted(set(group["final_backbone"])))}
        for column, digits in (("best_val_auc", 4), ("test_auc", 4), ("test_acc", 4), ("wall_min", 1)):
            spread = group[column].std(ddof=1) if len(group) > 1 else 0.0
            row[column] = f"{group[column].mean():.{digits}f} ({spread:.{digits}f})"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=common.default_data())
    p.add_argument("--space", default="backbones")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--budget", type=float, default=900, help="the default budget in seconds (the cpu profile's)")
    p.add_argument("--num-samples", type=int, default=24, help="the default trials (the cpu profile's)")
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench/search-value").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    p.add_argument("extra", nargs="*", help="more search.run flags for every arm (after --)")
    args = p.parse_args()
    from spaces import get_space
    space = get_space(args.space)
    first = len(space.cpu_backbones or space.backbones)
    seeds, arms = [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; arms: {', '.join(ARMS)}")
    work, started = Path(args.work), time.time()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for arm in [a for a in ARMS if a in arms]:
        for seed in seeds:
            flags = arm_flags(arm, seed, seeds, budget=args.budget, samples=args.num_samples, first=first, work=work)
            rows.append(measure(run_arm(arm, seed, flags, args, work), arm, seed))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table = pd.concat([table, summary(table)], ignore_index=True)
    common.finish("search_value", table, started=started, benchmarks=args.benchmarks,
                  section="What the search adds over a backbone sweep (issue 30)",
                  settings=f"{args.space} space, {args.data}, --weights random, budget {args.budget:.0f} s "
                           f"({args.num_samples} trials; x3 for the 3x arms), each arm finalized with --top-k 1 "
                           f"--warm-restart none; seeds {args.seeds}")


if __name__ == "__main__":
    main()
