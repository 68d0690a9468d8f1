"""What the stop rule saves (issue 43): the README's default run on PneumoniaMNIST (`--space backbones
--weights random`), per seed with the rule (the default) and without it (`--no-stop-rule`), each
finalized the same way (the default finalize), one after the other on one machine:

    python bench/stop_rule.py --seeds 0,1,2 --benchmarks      # ~1.5 hours on 2 cores

One row per seed in `--out` (`seed`, `full_search_s`, `stopped_search_s`, `full_test_auc`,
`stopped_test_auc`, and what each ran), appended once both runs of the seed have landed; a seed
already there is not run again. Search seconds are `timings.json`'s `search_seconds` (start to the
end of the search, finalize excluded). The target: the stopped searches take at most 70% of the full
ones' time over the seeds, with mean test AUC within 0.005.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402

ARMS = {"full": ["--no-stop-rule"], "stopped": []}


def run(arm: str, seed: int, work: Path, extra: list[str]) -> dict:
    """One run, measured; a run that finished before (its final/metrics.json written) is measured
    again, not run again (the full runs do not depend on the rule: rename a folder to run it again)."""
    folder = work / f"{arm}-seed{seed}"
    if not (folder / "final" / "metrics.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a run cut short is run again whole: its time is its measure
        command = [sys.executable, "-m", "search.run", "--space", "backbones", "--weights", "random", "--seed",
                   str(seed), "--storage", str(work), "--name", folder.name, *ARMS[arm], *extra]
        print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: {' '.join(command[1:])}", flush=True)
        with open(work / f"{folder.name}.log", "w") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"{arm} seed {seed} failed ({done.returncode}); see {work / f'{folder.name}.log'}")
    timings = json.loads((folder / "timings.json").read_text())
    metrics = json.loads((folder / "final" / "metrics.json").read_text())
    test = metrics["models"][metrics["chosen"]]["test"]
    stop = timings.get("stop_rule", {})
    return {f"{arm}_search_s": round(timings["search_seconds"]), f"{arm}_test_auc": round(test["auc"], 4),
            f"{arm}_test_acc": round(test["accuracy"], 4), f"{arm}_trials": len(pd.read_csv(folder / "leaderboard.csv")),
            f"{arm}_stop": stop.get("bound") or ("" if stop.get("on") else "off")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"stop_rule-{time.strftime('%Y%m%d')}.csv"))
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench/stop-rule").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    p.add_argument("extra", nargs="*", help="more search.run flags for both runs (after --)")
    args = p.parse_args()
    work, out, started = Path(args.work), Path(args.out), time.time()
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame({"seed": []})
    for seed in seeds:
        if (done["seed"] == seed).any():
            continue
        row = {"seed": seed}
        for arm in ARMS:
            row.update(run(arm, seed, work, args.extra))
        row.update(machine=common.machine(), commit=common.commit())
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True) if len(done) else pd.DataFrame([row])
        done.to_csv(out, index=False)
        print(row, flush=True)
    table = done[done["seed"].isin(seeds)]
    share = table["stopped_search_s"].sum() / table["full_search_s"].sum()
    gap = table["stopped_test_auc"].mean() - table["full_test_auc"].mean()
    print(table.to_string(index=False))
    print(f"stopped / full search time over seeds {args.seeds}: {share:.0%} (target <= 70%); "
          f"mean test AUC stopped - full: {gap:+.4f} (target within 0.005)")
    if args.benchmarks:
        common.finish("stop_rule", table, started=started, benchmarks=True,
                      section="What the stop rule saves (issue 43)",
                      settings=f"the README's default run (--space backbones --weights random), with and without "
                               f"the stop rule, seeds {args.seeds}: stopped / full search time {share:.0%}, "
                               f"mean test AUC difference {gap:+.4f}")


if __name__ == "__main__":
    main()
