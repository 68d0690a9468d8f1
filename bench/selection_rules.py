"""Which trial a search ships, at which epoch, and what another rule would have shipped (issue 30).
For searches already run (by default the arms of `bench/search_value.py`, each finalized with
`--top-k 1 --warm-restart none`), each rule's pick is scored on test as the model it would ship.

    python -m bench.selection_rules                      # reads ~/.cache/lung-search-bench/search-value

Rules (each sees validation only):
- `peak_last` (today's): rank by the trial's best validation AUC over its epochs (the leaderboard's
  order), ship its network at its max epochs (finalize's `--epochs full`);
- `peak_best`: the same pick, shipped at its best epoch (the model the leaderboard's value belongs to);
- `last`: rank by the validation AUC of each trial's last epoch, ship at its max epochs.

A model is the trial's last checkpoint when that is the epoch asked for; else it is trained again
from its checkpoint or from scratch to that epoch, each epoch on the threads the trial had then.
Training is deterministic per seed, epoch and thread count, so that is the trial's own network:
`val_check` is the largest gap between a model's validation AUC here and the one its trial reported
for that epoch. Where every finished trial kept its checkpoint
(`--keep-checkpoints all`), `median_trial` and `best_trial` give the spread of the finished trials'
test AUC (the best looks at test: an oracle). Scores are cached in `<work>/selection-scores.json`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from bench import common

ROOT = Path(__file__).resolve().parents[1]
from search.engine.checkpoints import newest_readable, registered

RULES = ("peak_last", "peak_best", "last")


def epochs_of(folder: Path) -> pd.DataFrame:
    """Per trial that reported: peak validation AUC and its epoch, the last epoch's AUC, epochs run,
    max epochs, and each epoch's AUC."""
    rows = []
    for trial in sorted(folder.glob("trial_*")):
        if not (trial / "progress.csv").is_file() or not (trial / "params.json").is_file():
            continue
        progress = pd.read_csv(trial / "progress.csv").drop_duplicates("training_iteration", keep="last")
        config = json.loads((trial / "params.json").read_text())
        by_epoch = dict(zip(progress["training_iteration"].astype(int), progress["val_auc"]))
        rows.append({"trial_id": trial.name[len("trial_"):], "backbone": config["backbone"],
                     "peak_auc": max(by_epoch.values()), "best_epoch": max(by_epoch, key=by_epoch.get),
                     "last_auc": by_epoch[max(by_epoch)], "epochs": max(by_epoch),
                     "max_epochs": int(config["max_epochs"]), "by_epoch": by_epoch})
    return pd.DataFrame(rows)


def model_at(folder: Path, trial_id: str, epoch: int, data) -> dict:
    """Validation and test AUC of the trial's network at `epoch`: its last checkpoint if it is at
    `epoch`, else trained on from that checkpoint (if earlier) or from scratch."""
    from search.outputs.evaluate import score
    from trainables.train import Training
    trial = folder / f"trial_{trial_id}"
    run = Training(json.loads((trial / "params.json").read_text()), data)
    saved, _ = newest_readable(trial)
    state = saved["folds"][0] if saved else None
    if state and state["epoch"] <= epoch:
        run.load_state_dict(state)
    # each epoch on the thread count the trial had then: float sums differ between thread counts
    threads = pd.read_csv(trial / "progress.csv").set_index("training_iteration")["threads"].to_dict()
    for _ in range(run.epoch, epoch):
        torch.set_num_threads(int(threads.get(run.epoch + 1, torch.get_num_threads())))
        next(run.epochs(until=run.epoch + 1))
    (test_x, test_y), val_y = data.arrays("test"), data.arrays("val")[1]
    return {"val_auc": score(val_y, run.predict(run.val_x), "val_auc"),
            "test_auc": score(test_y, run.predict(test_x), "val_auc")}


def pick(trials: pd.DataFrame, rule: str) -> tuple[pd.Series, int]:
    """The trial a rule ships, and the epoch it ships it at."""
    chosen = trials.loc[trials["last_auc" if rule == "last" else "peak_auc"].idxmax()]
    return chosen, int(chosen["best_epoch"] if rule == "peak_best" else chosen["max_epochs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(Path("~/.cache/lung-search-bench/search-value").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    args = p.parse_args()
    from search.final.pipeline import _search_data
    from search.outputs.records import read_search_record
    work = Path(args.work)
    cache_file = work / "selection-scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    started, rows, loaded = time.time(), [], {}
    for folder in sorted(f.parent.parent for f in work.glob("*/final/metrics.json")):
        record = read_search_record(folder)
        key = record["data"]["fingerprint"], record["options"]["seed"]

        def scored(trial_id: str, epoch: int) -> dict:
            name = f"{folder.name}/{trial_id}/{epoch}"
            if name not in cache:
                if key not in loaded:
                    loaded[key] = _search_data(record, None)
                cache[name] = model_at(folder, trial_id, epoch, loaded[key])
                cache_file.write_text(json.dumps(cache, indent=1))
            return cache[name]

        trials = epochs_of(folder).set_index("trial_id", drop=False)
        row, gaps = {"search": folder.name, "trials": len(trials)}, []
        for rule in RULES:
            chosen, epoch = pick(trials, rule)
            result = scored(chosen["trial_id"], epoch)
            if epoch <= chosen["epochs"]:
                gaps.append(abs(result["val_auc"] - chosen["by_epoch"][epoch]))
            row[rule] = round(result["test_auc"], 4)
            row[f"{rule}_pick"] = f"{chosen['backbone']} {chosen['trial_id']} @{epoch}"
        finished = trials[trials["epochs"] == trials["max_epochs"]]
        if all(registered(folder / f"trial_{t}") for t in finished["trial_id"]):
            tests = pd.Series([scored(t, int(e))["test_auc"] for t, e in zip(finished["trial_id"], finished["epochs"])])
            row.update(median_trial=round(tests.median(), 4), best_trial=round(tests.max(), 4))
        row["val_check"] = f"{max(gaps):.1e}"
        rows.append(row)
        print(row, flush=True)
    if not rows:
        raise SystemExit(f"no finalized search under {work}; run bench/search_value.py first")
    table = pd.DataFrame(rows)
    numbers = [c for c in ("median_trial", "best_trial", *RULES) if c in table]
    means = {"search": "mean", "trials": "", **{c: round(table[c].mean(), 4) for c in numbers}}
    table = pd.concat([table, pd.DataFrame([means])], ignore_index=True)
    table = table.astype(object).where(table.notna(), "")
    common.finish("selection_rules", table, started=started, benchmarks=args.benchmarks,
                  section="What the search adds over a backbone sweep (issue 30)",
                  settings=f"the finalized searches under {work}")


if __name__ == "__main__":
    main()
