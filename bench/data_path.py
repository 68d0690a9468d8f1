"""Data set-up per trial: the decoded arrays shared through Ray's object store (what the search
does) against each trial decoding the image folder itself, in real Ray Tune trials.

    python -m bench.data_path --folder ../shared/data/sarscov2-ct
    python -m bench.data_path --folder /tmp/pneumonia-pngs --image-size 224 --scales 1,10

Each trial times its own set-up, from its first line to the train tensors being ready: either
`ray.get` of the shared `Dataset` (put once by the driver, as `tune.with_parameters` does) or
`load_dataset(folder)`. `--scales` also runs the shared path on the arrays repeated K times, to show
that its cost does not grow with the data.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def _tensors(data) -> float:
    import torch
    images, labels = data.arrays("train")
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return float(x.shape[0] + y.shape[0])


def shared_trial(config: dict, refs: list) -> None:
    import ray
    from ray import tune

    import torch  # noqa: F401  (imported before the clock: a trial's own module has them loaded already)

    import ingest.dataset  # noqa: F401
    start = time.perf_counter()
    data = ray.get(refs[0])
    _tensors(data)
    tune.report({"setup_seconds": time.perf_counter() - start, "images": len(data.labels)})


def decoding_trial(config: dict) -> None:
    import torch  # noqa: F401
    from ray import tune

    from ingest.dataset import load_dataset
    start = time.perf_counter()
    data = load_dataset(config["folder"], image_size=config["image_size"], channels=1, seed=0)
    _tensors(data)
    tune.report({"setup_seconds": time.perf_counter() - start, "images": len(data.labels)})


def repeated(data, k: int):
    if k == 1:
        return data
    return dataclasses.replace(data, images=np.concatenate([data.images] * k), labels=np.tile(data.labels, k),
                               split=np.tile(data.split, k), groups=None, paths=None)


def run_trials(trainable, trials: int, config: dict) -> list[float]:
    from ray import tune
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=config,
                       tune_config=tune.TuneConfig(num_samples=trials),
                       run_config=tune.RunConfig(storage_path="/tmp/bench-data-path", verbose=0))
    results = tuner.fit()
    return [r.metrics["setup_seconds"] for r in results]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=str(common.SHARED / "sarscov2-ct"), help="an image folder")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--trials", type=int, default=4, help="trials per arm")
    p.add_argument("--scales", default="1,10", help="copies of the arrays for the shared arm")
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    import ray
    from ray import tune

    from ingest.dataset import load_dataset
    started = time.time()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t0 = time.perf_counter()
    data = load_dataset(args.folder, image_size=args.image_size, channels=1, seed=0)
    driver_decode = time.perf_counter() - t0
    rows = [{"arm": "driver decodes once (before the search)", "images": len(data.labels),
             "array MB": round(data.images.nbytes / 1e6, 1), "setup s per trial (median)": round(driver_decode, 3),
             "per-trial runs": f"{driver_decode:.2f}"}]
    for k in [int(s) for s in args.scales.split(",")]:
        big = repeated(data, k)
        ref = ray.put(big)
        seconds = run_trials(tune.with_parameters(shared_trial, refs=[ref]), args.trials, {})
        rows.append({"arm": f"shared via object store (x{k})", "images": len(big.labels),
                     "array MB": round(big.images.nbytes / 1e6, 1),
                     "setup s per trial (median)": round(statistics.median(seconds), 4),
                     "per-trial runs": " ".join(f"{s:.3f}" for s in seconds)})
        del ref, big
        print(rows[-1], flush=True)
    seconds = run_trials(decoding_trial, args.trials, {"folder": str(Path(args.folder).resolve()),
                                                       "image_size": args.image_size})
    rows.append({"arm": "each trial decodes the folder", "images": len(data.labels),
                 "array MB": round(data.images.nbytes / 1e6, 1),
                 "setup s per trial (median)": round(statistics.median(seconds), 3),
                 "per-trial runs": " ".join(f"{s:.2f}" for s in seconds)})
    ray.shutdown()
    table = pd.DataFrame(rows)
    shared_1x = table["setup s per trial (median)"].iloc[1]
    table["decoding / this"] = (table["setup s per trial (median)"].iloc[-1] / table["setup s per trial (median)"]).round(1)
    print(f"shared x1: {shared_1x:.4f} s per trial")
    common.finish("data_path", table, settings=f"{args.folder}, {args.image_size} px, {args.trials} trials per arm, "
                  "1 CPU per trial", started=started, benchmarks=args.benchmarks,
                  section="Data path (issue 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
