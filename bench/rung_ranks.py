"""Does a cheap first rung rank trials as the full-size result does (issue 50)? Per CT set, the grid's
trials (`--space grid`: EfficientNet-Lite0/1/2 from ImageNet and the small CNN, each at lr 1e-4 / 3e-4 /
1e-3, the plain recipe otherwise) are trained the way a search trains them (96 px, the cpu profile's
8 epochs, K folds where the search would use them, their fold mean each epoch). Each trial's score at
the first rung (epoch 1) at full size and at each `--early-sizes` side is ranked against its final
score (its best epoch at full size, what the leaderboard ranks by):

    python -m bench.rung_ranks --sets sarscov2-ct,covid-ct-ucsd --early-sizes 48,64   # ~1 hour on 2 cores

Per set and first-rung size: Spearman's rank correlation with the final score, and whether ASHA's
keep at that rung (the top 1/3) holds the final best trial. Trials run `--workers` at a time, one
thread each; a row per trial is appended to `--out` as it lands (a trial already there is not run
again).
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]

SETS = {"sarscov2-ct": "sarscov2-ct", "covid-ct-ucsd": "covid-ct-ucsd/patients.csv"}


def grid_configs() -> list[dict]:
    from spaces.backbones import LITE, grid_trials
    return [{"backbone": b, **values} for b in LITE for values in grid_trials(b, pretrained=True)]


def load(name: str, size: int, seed: int):
    from search.options import resolve_batch_size, resolve_folds
    from ingest.dataset import load_dataset
    data = load_dataset(common.SHARED / SETS[name], image_size=size, channels=1, seed=seed)
    pool = len(data.indices("train")) + len(data.indices("val"))
    folds = resolve_folds("auto", pool)
    batch = resolve_batch_size("auto", pool - pool // folds if folds > 1 else len(data.indices("train")))
    return data, folds, batch


def train(job: tuple) -> dict:
    """One trial: its fold-mean validation AUC per epoch (`epochs` of them) with the first `early_epochs`
    at `early_size` (0: full size throughout)."""
    import torch
    torch.set_num_threads(1)
    name, config, early_size, epochs, args = job
    from trainables.train import Training
    data, folds, batch = load(name, args.image_size, args.seed)
    base = {"weights": "random" if config["backbone"] == "small_cnn" else "imagenet", "image_size": args.image_size,
            "batch_size": batch, "max_epochs": args.max_epochs, "seed": args.seed, "early_size": early_size,
            "early_epochs": 1}
    run_config = {**base, **config}
    splits = data.cv_folds(folds, args.seed) if folds > 1 else [(data.indices("train"), data.indices("val"))]
    runs = [Training(run_config, data, train=tr, val=va) for tr, va in splits]
    started, aucs = time.time(), []
    for per_fold in zip(*(run.epochs(until=epochs) for run in runs)):
        aucs.append(float(np.mean([m["val_auc"] for m in per_fold])))
    return {"data": name, "backbone": config["backbone"], "lr": config["lr"], "early_size": early_size,
            "folds": folds, "batch": batch, "execution": per_fold[0]["execution"],
            "val_auc_by_epoch": " ".join(f"{a:.4f}" for a in aucs), "seconds": round(time.time() - started, 1)}


def summarise(rows: pd.DataFrame, image_size: int) -> pd.DataFrame:
    """Per set and first-rung size: Spearman with the final score, and ASHA's keep at that rung."""
    from scipy.stats import spearmanr
    out = []
    for name, group in rows.groupby("data", sort=False):
        full = group[group["early_size"] == 0].set_index(["backbone", "lr"])
        final = full["val_auc_by_epoch"].map(lambda s: max(map(float, s.split())))
        best = final.idxmax()
        for early, arm in group.groupby("early_size"):
            first = arm.set_index(["backbone", "lr"])["val_auc_by_epoch"].map(lambda s: float(s.split()[0]))
            first = first.reindex(final.index)
            keep = first.sort_values(ascending=False).index[:max(1, len(first) // 3)]
            out.append({"data": name, "first rung": f"{early} px" if early else f"{image_size} px (full)",
                        "trials": len(first), "spearman with final": round(spearmanr(first, final).statistic, 3),
                        "top 1/3 at the rung holds the final best": best in keep,
                        "first-rung seconds (sum)": round(arm["seconds"].sum() if early else np.nan, 1)})
    return pd.DataFrame(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--early-sizes", default="48,64", help="first-rung sides to rank at (full size always runs)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"rung_ranks-{time.strftime('%Y%m%d')}.csv"))
    p.add_argument("--benchmarks", action="store_true")
    args = p.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    if unknown := [s for s in sets if s not in SETS]:
        p.error(f"unknown set(s) {unknown}; sets: {', '.join(SETS)}")
    sizes = [int(s) for s in args.early_sizes.split(",") if s]
    out, started = Path(args.out), time.time()
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=["data", "backbone", "lr", "early_size"])
    have = {(r.data, r.backbone, float(r.lr), int(r.early_size)) for r in done.itertuples()}
    jobs = [(name, config, early, args.max_epochs if early == 0 else 1, args)
            for name in sets for early in (0, *sizes) for config in grid_configs()
            if (name, config["backbone"], float(config["lr"]), early) not in have]
    jobs.sort(key=lambda job: -job[3])  # the long full-size trials first, the short first rungs fill in
    provenance = common.provenance(allow_dirty=False)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(train, jobs):
            row.update(provenance)
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True) if len(done) else pd.DataFrame([row])
            done.to_csv(out, index=False)
            print(row, flush=True)
    table = summarise(done[done["data"].isin(sets)], args.image_size)
    print(table.to_string(index=False))
    common.finish("rung_ranks", table, started=started, benchmarks=args.benchmarks,
                  section="Does a cheap first rung rank trials as the full size does (issue 50)",
                  settings=f"the grid's 12 trials per set, {args.image_size} px, {args.max_epochs} epochs, seed "
                           f"{args.seed}; rows in {out.name}")


if __name__ == "__main__":
    main()
