"""The training loop: one model, its optimizer and schedule, trained epoch by epoch on a Dataset,
and the preprocessing and prediction that every later stage shares. No Ray here:
`trainables.trainable` runs this loop inside Ray Tune, `search.final.retrain` as Ray tasks, and
`search.predict` uses `Preprocess` and `predict_proba` without Ray.

Example:
    >>> run = Training(config, data)
    >>> for metrics in run.epochs(until=3):
    ...     print(metrics["epoch"], metrics["val_auc"])
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from trainables.augment import augment_batch
from trainables.config import parse_class_weights, validate_config
from trainables.execution import choose_execution, resolve
from ingest.dataset import Dataset
from ingest.stores import Rows, rows
from trainables.metrics import classification_metrics
from trainables.models import Classifier, build_model, min_input_size


class Training:
    """One model, its optimizer and schedule, trained epoch by epoch on the images `train` (indices
    into `data`; default the train split) and validated on `val` (default the val split).

    Example (outside Ray Tune, as search/final/retrain.py does):
        >>> run = Training(config, data, train=np.concatenate([data.indices("train"), data.indices("val")]))
        >>> history = list(run.epochs(until=8))
        >>> test_probs = run.predict(data.arrays("test")[0])
    """

    def __init__(self, config: dict, data: Dataset, *, train: np.ndarray | None = None,
                 val: np.ndarray | None = None):
        self.config = config = validate_config(config, num_classes=data.num_classes)
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(config["seed"])
        self.model = build_model(config, num_classes=data.num_classes, in_chans=data.channels).to(device)
        self.full_size = min_input_size(config["backbone"], data.images.shape[1])
        self.early_size = min_input_size(config["backbone"], config["early_size"]) if config["early_size"] else 0
        # "auto" precision and layout: what trains fastest here, measured once per backbone and machine
        self.execution = choose_execution(
            self.model, backbone=config["backbone"], device=device, precision=config["precision"],
            memory_format=config["memory_format"], input_size=self.full_size, channels=data.channels,
            batch_size=config["batch_size"], num_classes=data.num_classes)
        self.prep = Preprocess(self.model, config["backbone"], channels=data.channels, image_size=data.images.shape[1],
                               precision=self.execution["precision"], memory_format=self.execution["memory_format"])
        if self.prep.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        train = data.indices("train") if train is None else train
        val = data.indices("val") if val is None else val
        train_labels = data.labels[train]
        # small data: the split on the device once; the disk store: rows read batch by batch (Rows)
        self.train_x = rows(data.images, train) if data.on_disk else torch.from_numpy(data.images[train]).to(device)
        self.train_y = torch.from_numpy(train_labels).to(device)
        self.val_x, self.val_y = rows(data.images, val), data.labels[val]
        weights = class_weights(config["class_weights"], train_labels, data.num_classes,
                                minority_weight=config["minority_weight"])
        self.loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights, device=device),
                                           label_smoothing=config["label_smoothing"])
        self.steps_per_epoch = max(1, len(train_labels) // config["batch_size"])
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.epoch = 0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.prep.input_size = self.input_size(self.epoch)

    def input_size(self, epoch: int) -> int:
        """The side epoch `epoch` trains and validates at: `early_size` for the first `early_epochs`
        (the first rung of a search, cheap), the full size after; a function of the epoch alone, so that
        every trial at a rung was judged at the same size."""
        return self.early_size if self.early_size and epoch <= self.config["early_epochs"] else self.full_size

    def restart(self, epochs: int, *, lr_scale: float = 0.5) -> None:
        """A warm restart (SGDR, Loshchilov & Hutter 2017): the network as it is, a fresh optimizer and
        one more cycle of the config's schedule, `epochs` long, from `lr_scale` x its learning rate;
        `epochs()` then trains to that cycle's end.

        Example:
            >>> list(run.epochs())        # the config's max_epochs, say 8
            >>> run.restart(8)
            >>> list(run.epochs())        # epochs 9-16, from half the learning rate down again
        """
        self.config = {**self.config, "lr": self.config["lr"] * lr_scale, "max_epochs": self.epoch + epochs}
        self.optimizer = make_optimizer(self.model, self.config)
        self.scheduler = make_scheduler(self.optimizer, {**self.config, "max_epochs": epochs}, self.steps_per_epoch)

    def epochs(self, until: int | None = None) -> Iterator[dict]:
        """Train up to epoch `until` (default `max_epochs`; the schedule always spans `max_epochs`),
        yielding each epoch's validation metrics, train loss, learning rate, timings and model size."""
        config, model = self.config, self.model
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        while self.epoch < (until or config["max_epochs"]):
            self.epoch += 1
            self.prep.input_size = self.input_size(self.epoch)
            t0 = time.perf_counter()
            # the epoch's own seeds, the global one for dropout included: an epoch trained again from a
            # checkpoint (a worker lost, a resumed search) is the epoch the uninterrupted trial trains
            shuffle_seed, dropout_seed = np.random.SeedSequence([config["seed"], self.epoch]).generate_state(2)
            generator = torch.Generator().manual_seed(int(shuffle_seed))
            torch.manual_seed(int(dropout_seed))
            train_loss = train_one_epoch(model, self.prep, self.train_x, self.train_y, self.loss_fn,
                                         self.optimizer, self.scheduler, batch_size=config["batch_size"],
                                         augment=config["augment"], generator=generator, epoch=self.epoch)
            t1 = time.perf_counter()
            probs = self.predict(self.val_x)
            val_loss = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                  torch.from_numpy(self.val_y)).item()
            scores = classification_metrics(self.val_y, probs)
            t2 = time.perf_counter()
            yield {"val_auc": scores["auc"], "val_acc": scores["acc"], "val_f1": scores["f1"],
                   "val_loss": val_loss, "train_loss": train_loss, "epoch": self.epoch,
                   "lr": self.optimizer.param_groups[0]["lr"], "train_seconds": t1 - t0,
                   "eval_seconds": t2 - t1, "params_m": n_params / 1e6,
                   "trainable_params_m": n_trainable / 1e6, "input_size": self.prep.input_size,
                   "execution": f"{self.execution['precision']}/{self.execution['memory_format']}"}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities at the config's own precision ("auto": the device's default, as a saved
        model predicts), whatever precision training was measured fastest at."""
        return predict_proba(self.model, self.prep, images,
                             autocast=resolve(self.device, self.config["precision"], self.config["memory_format"])[0])


class Preprocess:
    """uint8 (B, H, W, C) -> normalised float (B, C, S, S) on the model's device, with the mean and
    std of the backbone's `pretrained_cfg` and the smallest input size the backbone accepts; and how
    the model runs there: `autocast` (enabled, dtype) and `channels_last` (trainables.execution.resolve)."""

    def __init__(self, model: Classifier, backbone: str, *, channels: int, image_size: int, precision: str = "auto",
                 memory_format: str = "auto"):
        cfg = model.backbone.pretrained_cfg
        mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
        if channels == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        self.device = next(model.parameters()).device
        self.mean = mean.view(1, -1, 1, 1).to(self.device)
        self.std = std.view(1, -1, 1, 1).to(self.device)
        self.input_size = min_input_size(backbone, image_size)
        self.autocast, self.channels_last = resolve(self.device, precision, memory_format)

    def __call__(self, x_uint8: torch.Tensor, *, augment: str = "none",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x = x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        if augment != "none":
            x = augment_batch(x, augment, generator)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        # one channel permuted from (B, H, W, 1) keeps channels-last strides, which .contiguous() leaves as they
        # are (a size-1 dimension's stride does not count): convolutions would then run channels-last
        return x if x.stride()[-1] == 1 and x.stride()[1] == x.shape[2] * x.shape[3] else \
            x.clone(memory_format=torch.contiguous_format)


def train_one_epoch(model, prep, train_x, train_y, loss_fn, optimizer, scheduler, *, batch_size: int,
                    augment: str, generator: torch.Generator, epoch: int) -> float:
    """One pass over the shuffled train split; returns the mean loss.

    Raises:
        FloatingPointError: the loss became NaN or infinite (the trial diverged).
    """
    model.train()
    device = train_y.device
    amp, dtype = prep.autocast
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    order = torch.randperm(len(train_y), generator=generator)
    batches = [order[start:start + batch_size] for start in range(0, len(order) - 1, batch_size)]
    batches = [idx for idx in batches if len(idx) >= 2]  # BatchNorm needs two samples
    total, seen = 0.0, 0
    for step, (idx, x_uint8) in enumerate(zip(batches, read_batches(train_x, batches))):
        idx = idx.to(device)
        x = prep(x_uint8, augment=augment, generator=generator)
        y = train_y[idx]
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn(model(x), y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step}: "
                                     f"the trial diverged (a lower lr or another optimizer may help)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def read_batches(images: torch.Tensor | Rows, batches: list[torch.Tensor], *, workers: int | None = None):
    """The uint8 images of each batch of indices: indexed on the device for a split held there; read
    from the disk store by a DataLoader otherwise. `workers`: its reading processes (default: on a
    GPU up to 4, the trial's CPUs, reading the next batches into pinned memory while the GPU trains;
    none on a CPU, where the trial's cores are busy training and a batch's rows read in microseconds)."""
    if isinstance(images, torch.Tensor):
        yield from (images[idx.to(images.device)] for idx in batches)
        return
    cuda = torch.cuda.is_available()
    if workers is None:
        workers = min(4, int(os.environ.get("OMP_NUM_THREADS") or 1)) if cuda else 0
    loader = torch.utils.data.DataLoader(_BatchRows(images, batches), batch_size=None, num_workers=workers,
                                         pin_memory=cuda, prefetch_factor=2 if workers else None)
    yield from loader


class _BatchRows(torch.utils.data.Dataset):
    """Batch k: the rows `batches[k]` of `images` (a disk split), as a uint8 tensor."""

    def __init__(self, images: Rows, batches: list[torch.Tensor]):
        self.images, self.batches = images, [b.numpy() for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self.images[self.batches[k]])


@torch.no_grad()
def predict_proba(model: nn.Module, prep: Preprocess, images: np.ndarray, *, batch_size: int = 256,
                  autocast: tuple[bool, torch.dtype] | None = None) -> np.ndarray:
    """Class probabilities (N, num_classes) for uint8 images (N, H, W, C); `autocast` (enabled, dtype)
    in place of the preprocessing's."""
    model.eval()
    amp, dtype = autocast or prep.autocast
    out = []
    for start in range(0, len(images), batch_size):
        x = prep(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
        with torch.autocast(prep.device.type, dtype=dtype, enabled=amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(out).numpy()


def class_weights(spec: str, labels: np.ndarray, num_classes: int, *,
                  minority_weight: float = 2.0) -> list[float] | None:
    """Loss weights per class: None; "balanced" n_total / (n_class * n_classes); "ratio" the rarest
    class `minority_weight` and the others 1; or an explicit "3:1:1".

    Example:
        >>> class_weights("balanced", np.array([0, 0, 0, 1]), 2)
        [0.6666666666666666, 2.0]
    """
    if spec == "none":
        return None
    explicit = parse_class_weights(spec, num_classes)
    if explicit is not None:
        return explicit
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    if spec == "balanced":
        return (len(labels) / (np.maximum(counts, 1) * num_classes)).tolist()
    weights = np.ones(num_classes)
    weights[int(np.argmin(counts))] = minority_weight
    return weights.tolist()


def make_optimizer(model: Classifier, config: dict) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over two learning rates: the backbone's `lr` and the head's
    `lr * head_lr_ratio`; no weight decay on biases and norms."""
    groups = []
    for part, lr in ((model.backbone, config["lr"]), (model.head, config["lr"] * config["head_lr_ratio"])):
        for group in param_groups_weight_decay(part, config["weight_decay"]):
            group["params"] = [p for p in group["params"] if p.requires_grad]
            if group["params"]:
                groups.append({**group, "lr": lr})
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"], nesterov=True)
    if config["optimizer"] == "adam":
        # Adam's weight decay is L2 on the gradient, as in the classic Keras recipes
        return torch.optim.Adam(groups, lr=config["lr"])
    return torch.optim.AdamW(groups, lr=config["lr"])


def make_scheduler(optimizer, config: dict, steps_per_epoch: int):
    """Per-step schedule over the full `max_epochs` (so an ASHA-stopped trial saw the same
    schedule as a finished one up to its last epoch)."""
    total = config["max_epochs"] * steps_per_epoch
    if config["schedule"] == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if config["schedule"] == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, round(config["restart_epochs"] * steps_per_epoch)))
    if config["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, round(config["step_epochs"] * steps_per_epoch)),
                                               gamma=config["step_gamma"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
