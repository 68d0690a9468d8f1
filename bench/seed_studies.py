"""Seed studies: on each shared data set, the classic pipeline published for it (one recipe of
`--space recipes`) and a budgeted `backbones` search, both finalized on the same split (same seed,
same data), in one table.

    python -m bench.seed_studies --weights random                  # CPU, all four data sets
    python -m bench.seed_studies --datasets sarscov2-ct --gpu      # full resolution on a GPU

Prints the table, writes `bench/results/seed_studies-<date>.csv`, and with `--benchmarks` puts the
table at the top of the "Seed studies" section of BENCHMARKS.md (older tables stay below it).
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

STUDIES = {
    "pneumoniamnist": {
        "data": "pneumoniamnist/pneumoniamnist.npz", "recipe": "mobilenetv3_small_warm_restarts",
        "published": "MobileNetV3-small, last blocks unfrozen, head LR 1e-2 / backbone 1e-6: accuracy 0.88"},
    "sarscov2-ct": {
        "data": "sarscov2-ct", "recipe": "inceptionv3_frozen_heavy_aug",
        "published": "InceptionV3 frozen + BN-dropout-dense head, heavy aug: val accuracy 0.76, sens 0.84, spec 0.70"},
    "covid-ct-ucsd": {
        "data": "covid-ct-ucsd/patients.csv", "recipe": "small_cnn_scratch", "time_budget": 1500,
        "published": "small CNN from scratch, 248 px grayscale: accuracy 0.70-0.80"},
    "covid19-xray-3class": {
        "data": "covid19-xray-3class", "recipe": "resnet50_finetune", "positive_class": "Covid",
        "published": "ResNet50 fine-tuned (+ ensemble, weights 3:1:1): accuracy 0.988, COVID recall 1.0 (own data)"},
}


def run_study(name: str, study: dict, args) -> list[dict]:
    from search.run import run_search
    from search.options import SearchOptions
    data = str(Path(args.shared) / study["data"])
    shared_options = dict(data=data, storage=args.storage, seed=args.seed, weights=args.weights,
                  profile="gpu" if args.gpu else "cpu", positive_class=study.get("positive_class"),
                  image_size=args.image_size, dedupe=args.dedupe, max_epochs=args.max_epochs, subset=args.subset)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for kind, options in (
            ("recipe", SearchOptions(space="recipes", recipes=study["recipe"], name=f"{name}-recipe-{stamp}",
                                     top_k=1, **shared_options)),
            ("search", SearchOptions(space="backbones", name=f"{name}-search-{stamp}",
                                     num_samples=args.num_samples,
                                     time_budget=None if args.gpu else study.get("time_budget", args.time_budget),
                                     **shared_options))):
        started = time.time()
        folder = run_search(options)
        wall = time.time() - started
        metrics = json.loads((folder / "final" / "metrics.json").read_text())
        record = json.loads((folder / "search_config.json").read_text())
        members = {n: m for n, m in metrics["models"].items() if m["kind"] == "member"}
        metric = record["options"]["metric"][4:]
        best_member = max(members, key=lambda n: members[n]["val"][metric])
        picks = ([("recipe " + study["recipe"], best_member)] if kind == "recipe" else
                 [("best searched single model", best_member), ("ensemble (final)", metrics["chosen"])])
        for label, model in picks:
            t = metrics["models"][model]["test"]
            rows.append({
                "data set": name, "split": _split(record["data"]), "published": study["published"],
                "model": f"{label}: {model}", "test AUC (95% CI)": _ci(t["auc"], t["ci"]["auc"]),
                "accuracy": f"{t['accuracy']:.3f}",
                "sensitivity (95% CI)": _ci(t["sensitivity"], t["ci"]["sensitivity"]),
                "specificity (95% CI)": _ci(t["specificity"], t["ci"]["specificity"]),
                "positive class": t["positive_class"], "test images": t["images"],
                "wall (search + finalize)": common.clock(wall), "weights": args.weights, "experiment": folder.name})
    return rows


def _split(data: dict) -> str:
    kind = data["split_kind"]
    if "grouped" in kind:
        return "by patient"
    return "given train/test" if kind.startswith("given") else "by image"


def _ci(value, interval) -> str:
    return "n/a" if value is None else f"{value:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(STUDIES), help=f"comma-separated: {', '.join(STUDIES)}")
    p.add_argument("--shared", default=str(common.SHARED),
                   help="the shared data folder")
    p.add_argument("--storage", default=str(ROOT / "experiments" / "seed-studies"))
    p.add_argument("--gpu", action="store_true", help="the gpu profile: 224 px, 64 trials of 30 epochs")
    p.add_argument("--weights", default="imagenet", choices=["imagenet", "random"])
    p.add_argument("--image-size", type=int, help="override the profile's image size")
    p.add_argument("--time-budget", type=float, default=900, help="CPU search budget in seconds per data set")
    p.add_argument("--num-samples", type=int, help="trials per search (default: the profile's)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: the profile's)")
    p.add_argument("--subset", type=int, help="at most this many images per split (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                   help="keep the copies of files found in two splits (the search drops the earlier ones)")
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    if not Path(args.shared).is_dir():
        p.error(f"--shared {args.shared}: no such folder (the shared data; or set SHARED_DATA)")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"error: unknown data set(s) {unknown}; choose from {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    started = time.time()
    rows = [row for name in names for row in run_study(name, STUDIES[name], args)]
    settings = (f"{'GPU profile' if args.gpu else 'CPU profile'}, weights {args.weights}, seed {args.seed}"
                + (f", {args.image_size} px" if args.image_size else ""))
    common.finish("seed_studies", pd.DataFrame(rows), settings=settings, started=started,
                  benchmarks=args.benchmarks, section="Seed studies (issue 7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
