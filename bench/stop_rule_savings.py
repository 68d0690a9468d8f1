"""What the stop rule saves (issues 43, 50): the default run (`--space backbones --weights random`) of each
shared data set, per seed with the rule (the default) and without it (`--no-stop-rule`), each
finalized the same way (the default finalize), one after the other on one machine:

    python -m bench.stop_rule_savings --datasets pneumoniamnist,sarscov2-ct,covid19-xray-3class,covid-ct-ucsd --seeds 0,1,2

One row per data set and seed in `--out` (`full_search_s`, `stopped_search_s`, `full_test_auc`,
`stopped_test_auc`, what each ran, the stop rule's outcome, and each arm's own commit and machine),
appended once both runs have landed; a row already there is not run again, and a run that finished
before is measured again, not run again, keeping the commit it ran at (its `provenance.json`).
Search seconds are `timings.json`'s `search_seconds` (start to the end of the search, finalize
excluded). The target: the stopped searches take at most 70% of the full ones' time, with mean
test AUC within 0.005.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]

ARMS = {"full": ["--no-stop-rule"], "stopped": []}
DATASETS = {"pneumoniamnist": "pneumoniamnist/pneumoniamnist.npz", "sarscov2-ct": "sarscov2-ct",
            "covid-ct-ucsd": "covid-ct-ucsd/patients.csv", "covid19-xray-3class": "covid19-xray-3class"}


def run(arm: str, name: str, seed: int, work: Path, extra: list[str], provenance: dict) -> dict:
    """One run, measured; a run that finished before (its final/metrics.json written) is measured
    again, not run again, with the commit it ran at (the full runs do not depend on the rule: rename
    a folder to run it again)."""
    folder = work / f"{name}-{arm}-seed{seed}"
    if not (folder / "final" / "metrics.json").is_file():
        common.run_search(folder, ["--space", "backbones", "--weights", "random", "--seed", str(seed), "--data",
                                   str(common.SHARED / DATASETS[name]), *ARMS[arm], *extra], f"{name} {arm} seed {seed}")
        (folder / "provenance.json").write_text(json.dumps(provenance))
    ran_at = json.loads((folder / "provenance.json").read_text()) if (folder / "provenance.json").is_file() \
        else {"commit": "unknown (ran before provenance was recorded)"}
    timings = json.loads((folder / "timings.json").read_text())
    metrics = json.loads((folder / "final" / "metrics.json").read_text())
    test = metrics["models"][metrics["chosen"]]["test"]
    stop = timings.get("stop_rule", {})
    return {f"{arm}_search_s": round(timings["search_seconds"]), f"{arm}_test_auc": round(test["auc"], 4),
            f"{arm}_test_acc": round(test["accuracy"], 4), f"{arm}_trials": len(pd.read_csv(folder / "leaderboard.csv")),
            f"{arm}_stop": stop.get("bound") or ("" if stop.get("on") else "off"),
            f"{arm}_commit": ran_at["commit"], f"{arm}_machine": ran_at.get("cpu", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="pneumoniamnist", help=f"comma-separated: {', '.join(DATASETS)}")
    p.add_argument("--seeds", default="0,1,2")
    common.add_arm_flags(p, results="stop_rule", work="stop-rule")
    args = p.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    if unknown := [n for n in names if n not in DATASETS]:
        p.error(f"unknown data set(s) {unknown}; choose from {', '.join(DATASETS)}")
    provenance = common.provenance(allow_dirty=args.allow_dirty)
    work, out, started = Path(args.work), Path(args.out), time.time()
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame({"data": [], "seed": []})
    for name in names:
        for seed in seeds:
            if ((done["data"] == name) & (done["seed"] == seed)).any():
                continue
            row = {"data": name, "seed": seed, "budget_s": 900, "versions": provenance["versions"]}
            for arm in ARMS:
                row.update(run(arm, name, seed, work, args.extra, provenance))
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True) if len(done) else pd.DataFrame([row])
            done.to_csv(out, index=False)
            print(row, flush=True)
    table = done[done["seed"].isin(seeds) & done["data"].isin(names)]
    print(table.to_string(index=False))
    for name, group in table.groupby("data", sort=False):
        share = group["stopped_search_s"].sum() / group["full_search_s"].sum()
        gap = group["stopped_test_auc"].mean() - group["full_test_auc"].mean()
        print(f"{name}: stopped / full search time over seeds {args.seeds}: {share:.0%} (target <= 70%); "
              f"mean test AUC stopped - full: {gap:+.4f} (target within 0.005)")
    share = table["stopped_search_s"].sum() / table["full_search_s"].sum()
    gap = table["stopped_test_auc"].mean() - table["full_test_auc"].mean()
    if args.benchmarks:
        common.finish("stop_rule", table, started=started, benchmarks=True,
                      section="What the stop rule saves (issue 43)",
                      settings=f"the default run (--space backbones --weights random) of {args.datasets}, with and "
                               f"without the stop rule, seeds {args.seeds}: stopped / full search time {share:.0%}, "
                               f"mean test AUC difference {gap:+.4f}")


if __name__ == "__main__":
    main()
