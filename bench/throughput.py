"""Training throughput: one trial's training loop (trainables.train) against a bare timm loop on the
same model, batch size, resolution, data and machine, in images per second.

    python bench/throughput.py                                     # CPU: resnet18, 32 px
    python bench/throughput.py --backbones resnet50,densenet121 --image-size 224 --device cuda

The bare loop is what a user would write by hand: `timm.create_model`, AdamW, cross-entropy, the
images already normalised float tensors on the device. The trial's loop also does what a search
needs: per-batch normalisation from uint8, optional augmentation, a per-step schedule, a finite-loss
check; on a GPU it adds mixed precision and channels-last (the bare loop is run both ways there).
Both loops run `--steps` timed steps after `--warmup` steps, alternating `--repeats` times so that
machine noise hits both; the ratio is of the medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402


def trial_loop(config: dict, data, steps: int, warmup: int) -> float:
    """Images/s of `trainables.train.train_one_epoch` over `steps` batches."""
    from trainables.train import Training, train_one_epoch
    run = Training(config, data)
    n = config["batch_size"] * (steps + warmup)
    x, y = run.train_x[:n], run.train_y[:n]
    generator = torch.Generator().manual_seed(0)
    warm_x, warm_y = x[:config["batch_size"] * warmup], y[:config["batch_size"] * warmup]
    step = dict(batch_size=config["batch_size"], augment=config["augment"], generator=generator, epoch=1)
    train_one_epoch(run.model, run.prep, warm_x, warm_y, run.loss_fn, run.optimizer, run.scheduler, **step)
    timed_x, timed_y = x[len(warm_x):], y[len(warm_y):]
    _sync(run.device)
    start = time.perf_counter()
    train_one_epoch(run.model, run.prep, timed_x, timed_y, run.loss_fn, run.optimizer, run.scheduler, **step)
    _sync(run.device)
    return len(timed_y) / (time.perf_counter() - start)


def bare_loop(config: dict, data, steps: int, warmup: int, *, precision: str, memory_format: str) -> float:
    """Images/s of the plain timm loop: model, AdamW, cross-entropy, pre-normalised batches, with
    the autocast and layout `precision` and `memory_format` mean on this device."""
    import timm

    from trainables.models import min_input_size
    from trainables.train import execution
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    (amp, dtype), channels_last = execution(device, precision, memory_format)
    torch.manual_seed(0)
    model = timm.create_model(config["backbone"], pretrained=False, num_classes=data.num_classes,
                              in_chans=data.channels).to(device)
    size = min_input_size(config["backbone"], data.images.shape[1])
    images, labels = data.arrays("train")
    bs = config["batch_size"]
    n = bs * (steps + warmup)
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float().div(255)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.45) / 0.225).to(device)
    y = torch.from_numpy(labels[:n]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def run(batches):
        for i in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = loss_fn(model(x[i * bs:(i + 1) * bs]), y[i * bs:(i + 1) * bs])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(range(warmup))
    _sync(device)
    start = time.perf_counter()
    run(range(warmup, warmup + steps))
    _sync(device)
    return steps * bs / (time.perf_counter() - start)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=common.default_data(), help="data set (default: PneumoniaMNIST npz)")
    p.add_argument("--backbones", default="resnet18", help="comma-separated timm names")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--gpu-profile", action="store_true",
                   help="the gpu profile's path: 224 px, precision and layout auto (bf16 + channels-last on a GPU)")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--memory-format", default="contiguous", choices=["auto", "channels_last", "contiguous"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--augment", default="none", help="the trial loop's augmentation (none: same work as bare)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a CPU trial of the default search holds 1 core)")
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    if args.gpu_profile:
        args.image_size, args.precision, args.memory_format = 224, "auto", "auto"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible on this machine")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from trainables.ingest.dataset import load_dataset
    started = time.time()
    data = load_dataset(args.data, image_size=args.image_size, channels=1, seed=0)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    rows = []
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        config = {"backbone": backbone, "weights": "random", "image_size": args.image_size,
                  "batch_size": args.batch_size, "max_epochs": 1, "augment": args.augment, "schedule": "cosine",
                  "precision": args.precision, "memory_format": args.memory_format}
        loops = {"trial loop": lambda: trial_loop(config, data, args.steps, args.warmup),
                 "bare timm (fp32)": lambda: bare_loop(config, data, args.steps, args.warmup, precision="fp32",
                                                       memory_format="contiguous")}
        if (args.precision, args.memory_format) != ("fp32", "contiguous"):
            loops[f"bare timm ({args.precision}, {args.memory_format})"] = lambda: bare_loop(
                config, data, args.steps, args.warmup, precision=args.precision, memory_format=args.memory_format)
        speeds = {name: [] for name in loops}
        for _ in range(args.repeats):
            for name, loop in loops.items():
                speeds[name].append(loop())
        trial = statistics.median(speeds["trial loop"])
        for name, values in speeds.items():
            rows.append({"device": common.machine(), "backbone": backbone, "loop": name,
                         "images/s (median)": round(statistics.median(values), 1),
                         "runs": " ".join(f"{v:.0f}" for v in values),
                         "trial loop / this": round(trial / statistics.median(values), 3)})
        print(pd.DataFrame(rows[-len(loops):]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    settings = (f"{args.image_size} px, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, "
                f"augment {args.augment}, precision {args.precision}, memory format {args.memory_format} (the trial "
                f"loop's; auto resolves per device), {'GPU' if gpu else f'{args.threads} CPU thread(s)'}")
    common.finish("throughput", table, settings=settings, started=started, benchmarks=args.benchmarks,
                  section="Training throughput (issue 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
