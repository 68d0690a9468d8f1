"""Training throughput: one trial's training loop (trainables.train) against the fastest bare timm loop
found on the same machine, model, batch size, resolution and data, in images per second.

    python -m bench.throughput                                  # CPU profile: `backbones` at 64 px, `lite` at 96 px
    python -m bench.throughput --sets lite:96 --device cuda --batch-size 128

The bare loops are what a user would write by hand: `timm.create_model`, AdamW, cross-entropy, the
images already normalised float tensors on the device, in each memory layout x precision (fp32,
bf16; fp16 too on a GPU), and `torch.compile` at the fastest of those (its compile time reported
apart: a trial pays it). The trial's loop also does what a search needs (per-batch normalisation
from uint8, a per-step schedule, a finite-loss check) and runs at the precision and layout that
`trainables.execution` chose for it ("auto"). Every loop runs `--steps` timed steps after `--warmup`,
alternating `--repeats` times so that machine noise hits all; the ratio is of the medians.
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

from bench import common

ROOT = Path(__file__).resolve().parents[1]

CPU_SETS = "backbones:64,lite:96"  # the CPU profile's sizes: 64 px for CT and X-ray folders, 96 for `lite`


class TrialLoop:
    """`trainables.train.train_one_epoch` over `steps` batches of one `Training`, built and warmed up
    once (as a trial trains epoch after epoch), at the precision and layout it chose ("auto")."""

    def __init__(self, config: dict, data, steps: int, warmup: int):
        from trainables.train import Training, train_one_epoch
        self.run, self.train_one_epoch = Training(config, data), train_one_epoch
        n = config["batch_size"] * (steps + warmup)
        x, y = self.run.train_x[:n], self.run.train_y[:n]
        self.step = dict(batch_size=config["batch_size"], augment=config["augment"],
                         generator=torch.Generator().manual_seed(0), epoch=1)
        cut = config["batch_size"] * warmup
        self.x, self.y = x[cut:], y[cut:]
        self._epoch(x[:cut], y[:cut])
        self.chosen = f"{self.run.execution['precision']}/{self.run.execution['memory_format']}"

    def _epoch(self, x, y) -> None:
        run = self.run
        self.train_one_epoch(run.model, run.prep, x, y, run.loss_fn, run.optimizer, run.scheduler, **self.step)

    def __call__(self) -> float:
        _sync(self.run.device)
        start = time.perf_counter()
        self._epoch(self.x, self.y)
        _sync(self.run.device)
        return len(self.y) / (time.perf_counter() - start)


class BareLoop:
    """The plain timm loop in one precision, layout and (optionally) compiled; built once, so that a
    compiled loop's compile time is paid in `compile_seconds`, not in the timed steps."""

    def __init__(self, config: dict, data, steps: int, warmup: int, *, precision: str, memory_format: str,
                 compiled: bool = False):
        import timm

        from trainables.execution import resolve
        from trainables.models import min_input_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        (self.amp, self.dtype), channels_last = resolve(self.device, precision, memory_format)
        torch.manual_seed(0)
        model = timm.create_model(config["backbone"], pretrained=False, num_classes=data.num_classes,
                                  in_chans=data.channels).to(self.device)
        size = min_input_size(config["backbone"], data.images.shape[1])
        images, labels = data.arrays("train")
        self.bs, self.steps, self.warmup = config["batch_size"], steps, warmup
        n = self.bs * (steps + warmup)
        x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float().div(255)
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        # one channel permuted from (N, H, W, 1) keeps channels-last strides that .contiguous() leaves: cloned
        self.x = ((x - 0.45) / 0.225).to(self.device).clone(memory_format=torch.contiguous_format)
        self.y = torch.from_numpy(labels[:n]).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.model = torch.compile(model) if compiled else model
        self.model.train()
        start = time.perf_counter()
        self.run(range(warmup))  # a compiled model compiles here
        _sync(self.device)
        self.compile_seconds = time.perf_counter() - start if compiled else 0.0

    def run(self, batches) -> None:
        bs = self.bs
        for i in batches:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp):
                loss = torch.nn.functional.cross_entropy(self.model(self.x[i * bs:(i + 1) * bs]),
                                                         self.y[i * bs:(i + 1) * bs])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def __call__(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.run(range(self.warmup, self.warmup + self.steps))
        _sync(self.device)
        return self.steps * self.bs / (time.perf_counter() - start)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def pairs(gpu: bool) -> list[tuple[str, str]]:
    precisions = ("fp32", "bf16", "fp16") if gpu else ("fp32", "bf16")
    return [(p, m) for p in precisions for m in ("contiguous", "channels_last")]


def measure(backbone: str, size: int, data, args, gpu: bool) -> list[dict]:
    """One backbone: the trial loop and every bare loop, `--repeats` times interleaved; then the
    compiled bare loop at the fastest eager pair (with `--compile`)."""
    config = {"backbone": backbone, "weights": "random", "image_size": size, "batch_size": args.batch_size,
              "max_epochs": 1, "augment": "none", "schedule": "cosine"}
    trial = TrialLoop(config, data, args.steps, args.warmup)
    loops = {"trial loop": trial, **{f"bare {p}/{m}": BareLoop(config, data, args.steps, args.warmup, precision=p,
                                                               memory_format=m) for p, m in pairs(gpu)}}
    speeds = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            speeds[name].append(loop())
    compile_seconds = {}
    if args.compile:
        best = max((n for n in loops if n != "trial loop"), key=lambda name: statistics.median(speeds[name]))
        p, m = best.split(" ")[1].split("/")
        name = f"bare {p}/{m} compiled"
        compiled = BareLoop(config, data, args.steps, args.warmup, precision=p, memory_format=m, compiled=True)
        compile_seconds[name] = compiled.compile_seconds
        speeds[name] = [compiled() for _ in range(args.repeats)]
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    fastest = max((n for n in medians if n != "trial loop"), key=medians.get)
    return [{"backbone": backbone, "px": size, "loop": f"trial loop ({trial.chosen})" if name == "trial loop" else name,
             "images/s (median)": round(value, 1), "runs": " ".join(f"{v:.0f}" for v in speeds[name]),
             "compile s": round(compile_seconds[name], 1) if name in compile_seconds else "",
             "trial loop / this": round(medians["trial loop"] / value, 3), "fastest bare": "yes" if name == fastest else ""}
            for name, value in medians.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=common.default_data(), help="data set (default: PneumoniaMNIST npz)")
    p.add_argument("--sets", default=CPU_SETS,
                   help="comma-separated <space>:<px> (every backbone of the space's CPU list at that size) or "
                        "<timm name>:<px>")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a CPU trial of the default search holds 1 core)")
    p.add_argument("--benchmarks", action="store_true", help="add the table to BENCHMARKS.md")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible on this machine")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    targets = backbones_at(args.sets, gpu, p.error)
    from ingest.dataset import load_dataset
    started, rows, datasets = time.time(), [], {}
    for backbone, size in targets:
        if size not in datasets:
            datasets[size] = load_dataset(args.data, image_size=size, channels=1, seed=0)
        rows += measure(backbone, size, datasets[size], args, gpu)
        print(pd.DataFrame(rows[-(len(pairs(gpu)) + 1 + args.compile):]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    settings = (f"batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, augment none, "
                f"{'GPU' if gpu else f'{args.threads} CPU thread(s)'}; the trial loop's precision and layout "
                f"'auto' (trainables.execution, cache {os.environ.get('LUNG_SEARCH_CACHE', '~/.cache/lung-search')})")
    common.finish("throughput", table, settings=settings, started=started, benchmarks=args.benchmarks,
                  section="Trials at the hardware's speed (issue 50)")
    return 0


def backbones_at(sets: str, gpu: bool, error) -> list[tuple[str, int]]:
    """(backbone, px) pairs of `--sets`: a space name stands for its backbones (its CPU list on a CPU)."""
    import timm

    from spaces import get_space, list_spaces
    out = []
    for item in [s.strip() for s in sets.split(",") if s.strip()]:
        name, _, px = item.partition(":")
        if not px.isdigit():
            error(f"--sets {item!r}: <space or backbone>:<px>, e.g. lite:96")
        if name in list_spaces():
            space = get_space(name)
            names = space.backbones if gpu or not space.cpu_backbones else space.cpu_backbones
        elif timm.is_model(name) or name == "small_cnn":
            names = (name,)
        else:
            error(f"--sets {item!r}: {name!r} is neither a space ({', '.join(list_spaces())}) nor a timm backbone")
        out += [(b, int(px)) for b in names if (b, int(px)) not in out]
    return out


if __name__ == "__main__":
    sys.exit(main())
