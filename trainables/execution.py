"""How a model trains fastest where it runs: the memory layout and autocast precision, measured.

What is fastest depends on the network and the machine, not on a rule of thumb: on one core of a
2-core AMD EPYC (AVX-512 with bf16) at 96 px, EfficientNet-Lite0 trains 1.5x faster channels-last in
float32 and slower in bfloat16 (its depthwise convolutions), ResNet18 and DenseNet121 1.9x faster in
bfloat16, the small CNN 2.6x in bfloat16 channels-last; on an Intel CPU without bf16 units bfloat16
is slower for all of them (BENCHMARKS.md, "Trials at the hardware's speed"). So "auto" measures: a
few training steps of a copy of the model per candidate, on random images of the trial's shape, once
per backbone, input size, batch size, device and library versions, cached in
`$LUNG_SEARCH_CACHE/execution.json` (default `~/.cache/lung-search`) so that every later trial and
search on the machine reads the choice instead of measuring again.

Example:
    >>> choice = choose_execution(model, backbone="resnet18", device=torch.device("cpu"), precision="auto",
    ...                           memory_format="auto", input_size=64, channels=1, batch_size=32, num_classes=2)
    >>> choice["precision"], choice["memory_format"]      # ('bf16', 'channels_last') on a CPU with bf16 units
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch
from filelock import FileLock

from core.errors import UserError

# the default a candidate must beat by MARGIN to be chosen: timing noise never flips a choice
MARGIN = 1.05
WARMUP_STEPS, TIMED_STEPS, ROUNDS = 1, 2, 2


def cache_file() -> Path:
    return Path(os.environ.get("LUNG_SEARCH_CACHE") or Path.home() / ".cache" / "lung-search") / "execution.json"


def device_name(device: torch.device) -> str:
    """The processor a choice was measured on: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def candidates(device: torch.device, precision: str, memory_format: str) -> list[tuple[str, str]]:
    """(precision, memory format) pairs to measure, the device's default first; a value that is not
    "auto" is kept as given."""
    if device.type == "cuda":
        half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        precisions, formats = (half, "fp32"), ("channels_last", "contiguous")
    else:
        precisions, formats = ("fp32", "bf16"), ("contiguous", "channels_last")
    return [(p, m) for p in (precisions if precision == "auto" else (precision,))
            for m in (formats if memory_format == "auto" else (memory_format,))]


def resolve(device: torch.device, precision: str, memory_format: str) -> tuple[tuple[bool, torch.dtype], bool]:
    """((autocast on, its dtype), channels-last) of a precision and memory format; "auto" is the
    device's default without measuring (bf16 or fp16 and channels-last on a GPU, fp32 contiguous on
    a CPU): what prediction uses.

    Raises:
        UserError: bfloat16 asked for on a GPU without it.
    """
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or auto")
    precision, memory_format = candidates(device, precision, memory_format)[0]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return (precision != "fp32", dtype), memory_format == "channels_last"


def choose_execution(model: torch.nn.Module, *, backbone: str, device: torch.device, precision: str,
                     memory_format: str, input_size: int, channels: int, batch_size: int, num_classes: int) -> dict:
    """The fastest (precision, memory format) for training `model` here: {"precision", "memory_format",
    "images_per_s" (per candidate measured, or {} when nothing was left to choose), "key"}. Measured
    once per key and cached (see the module docstring); concurrent trials on a node wait for one probe."""
    pairs = candidates(device, precision, memory_format)
    if len(pairs) == 1:
        return {"precision": pairs[0][0], "memory_format": pairs[0][1], "images_per_s": {}, "key": ""}
    # not keyed by the thread count: a trial retrained on more cores (finalize, shared idle cores) must run at
    # the precision its search trial ran at, or its numbers would differ
    key = " ".join(map(str, (device_name(device), f"torch {torch.__version__}", f"timm {version('timm')}", backbone,
                             f"{input_size}px", f"{channels}ch", f"batch {batch_size}", f"{precision}/{memory_format}")))
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=600)
        with lock:
            cached = _read(path)
            if key not in cached:
                cached[key] = probe(model, pairs, device=device, input_size=input_size, channels=channels,
                                    batch_size=batch_size, num_classes=num_classes)
                _write(path, cached)
            return {**cached[key], "key": key}
    except OSError:  # a cache that cannot be written (read-only home): measure for this trial alone
        return {**probe(model, pairs, device=device, input_size=input_size, channels=channels,
                        batch_size=batch_size, num_classes=num_classes), "key": key}


def probe(model: torch.nn.Module, pairs: list[tuple[str, str]], *, device: torch.device, input_size: int,
          channels: int, batch_size: int, num_classes: int) -> dict:
    """Train a copy of `model` for a few steps per candidate pair, interleaved over ROUNDS so that
    machine noise hits all; the fastest pair that beats the first (the default) by MARGIN, else the first."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, channels, input_size, input_size, generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    runs = {pair: _Run(model, pair, device) for pair in pairs}
    seconds = {pair: [] for pair in pairs}
    for round_ in range(ROUNDS):
        for pair, run in runs.items():
            for _ in range(WARMUP_STEPS if round_ == 0 else 0):
                run.step(x, y)
            _sync(device)
            start = time.perf_counter()
            for _ in range(TIMED_STEPS):
                run.step(x, y)
            _sync(device)
            seconds[pair].append(time.perf_counter() - start)
    speed = {pair: TIMED_STEPS * batch_size / min(s) for pair, s in seconds.items()}
    default = pairs[0]
    best = max(speed, key=speed.get)
    chosen = best if speed[best] > MARGIN * speed[default] else default
    return {"precision": chosen[0], "memory_format": chosen[1],
            "images_per_s": {f"{p}/{m}": round(v, 1) for (p, m), v in speed.items()}}


class _Run:
    """A copy of the model with its own AdamW, stepping in one (precision, memory format)."""

    def __init__(self, model: torch.nn.Module, pair: tuple[str, str], device: torch.device):
        (self.amp, self.dtype), self.channels_last = resolve(device, *pair)
        self.model = copy.deepcopy(model).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and self.dtype == torch.float16)
        self.device = device

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp):
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or damaged: measured again
        return {}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
