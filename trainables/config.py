"""The trial configuration: plain JSON-able keys, their defaults, and validation at the boundary.

Example:
    >>> config = validate_config({"backbone": "resnet18", "lr": 3e-4}, num_classes=2)
    >>> config["optimizer"], config["class_weights"]
    ('adamw', 'none')
"""
from __future__ import annotations

import difflib
import math

import timm

from core.choices import MEMORY_FORMATS, PRECISIONS, WEIGHTS
from core.errors import UserError

DEFAULT_CONFIG = {
    "recipe": None,               # name of a fixed recipe (spaces/recipes.py), a label only
    "backbone": "resnet18",
    "weights": "imagenet",       # "imagenet" or "random"
    "weights_dir": None,          # folder of local checkpoints <backbone>.pth
    "image_size": 32,             # side of the decoded images (fixed per search)
    "batch_size": 64,
    "max_epochs": 6,
    "seed": 0,                    # initialisation, shuffling and augmentation; with folds also the fold split
    "folds": 1,                   # K > 1: cross-validate over K folds of train+val (trainables.trainable)
    "lr": 1e-3,                   # backbone learning rate
    "head_lr_ratio": 1.0,         # head learning rate = lr * head_lr_ratio
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "momentum": 0.9,              # SGD only
    "schedule": "cosine",
    "restart_epochs": 2,          # cosine_restarts only: length of the first cycle
    "step_epochs": 2,             # step only: decay every this many epochs
    "step_gamma": 0.3,            # step only
    "dropout": 0.0,
    "head": "linear",
    "head_hidden": 256,
    "freeze_depth": 0,
    "class_weights": "none",      # "none", "balanced", "ratio", or explicit "3:1:1"
    "minority_weight": 2.0,       # ratio only: weight of the rarest class, the others 1
    "augment": "light",
    "label_smoothing": 0.0,
    "precision": "auto",          # "fp32", "bf16", "fp16" autocast; auto: the fastest, measured (trainables.execution)
    "memory_format": "auto",      # "channels_last" or "contiguous"; auto: the faster, measured (trainables.execution)
    "early_size": 0,              # > 0: the first `early_epochs` epochs train and validate at this side (cheap rungs)
    "early_epochs": 1,
}

CHOICES = {
    "weights": WEIGHTS,
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine", "cosine_restarts", "step"),
    "head": ("linear", "mlp"),
    "augment": ("none", "light", "medium", "heavy"),
    "precision": PRECISIONS,
    "memory_format": MEMORY_FORMATS,
}
POSITIVE = ("lr", "head_lr_ratio", "batch_size", "max_epochs", "image_size", "folds", "restart_epochs",
            "step_epochs", "step_gamma", "minority_weight", "head_hidden")
FRACTIONS = ("dropout", "label_smoothing", "momentum")


def validate_config(config: dict, *, num_classes: int) -> dict:
    """Defaults filled in and every key checked; the error names the key, value and what is allowed.

    Raises:
        UserError: an unknown key, or a value out of range.
    """
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise UserError(f"unknown config key(s) {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    out = {**DEFAULT_CONFIG, **config}
    for key, allowed in CHOICES.items():
        if out[key] not in allowed:
            raise UserError(f"{key} {out[key]!r} is not one of {list(allowed)}")
    for key in POSITIVE:
        if not (isinstance(out[key], (int, float)) and out[key] > 0 and math.isfinite(out[key])):
            raise UserError(f"{key} must be a positive number, got {out[key]!r}")
    for key in FRACTIONS:
        if not (isinstance(out[key], (int, float)) and 0 <= out[key] < 1):
            raise UserError(f"{key} must be in [0, 1), got {out[key]!r}")
    if not isinstance(out["weight_decay"], (int, float)) or out["weight_decay"] < 0:
        raise UserError(f"weight_decay must be >= 0, got {out['weight_decay']!r}")
    if not timm.is_model(out["backbone"]):
        close = difflib.get_close_matches(out["backbone"], timm.list_models(), n=5)
        raise UserError(f"unknown backbone {out['backbone']!r}; close timm names: {close} "
                        f"(all: timm.list_models())")
    from trainables.models import num_stages  # imports timm models; kept out of module import
    depth, stages = out["freeze_depth"], num_stages(out["backbone"])
    if not (isinstance(depth, int) and 0 <= depth <= stages):
        raise UserError(f"freeze_depth {depth!r} is out of range for {out['backbone']}: 0..{stages}")
    early_size, early_epochs = out["early_size"], out["early_epochs"]
    if not (isinstance(early_size, int) and (early_size == 0 or 8 <= early_size < out["image_size"])):
        raise UserError(f"early_size {early_size!r} must be 0 (off) or a whole number of pixels from 8 to below "
                        f"image_size {out['image_size']}")
    if early_size and not (isinstance(early_epochs, int) and 1 <= early_epochs < out["max_epochs"]):
        raise UserError(f"early_epochs {early_epochs!r} must be a whole number from 1 to below max_epochs "
                        f"{out['max_epochs']}")
    parse_class_weights(out["class_weights"], num_classes)
    return out


def check_backbone_names(names: str) -> None:
    """Raises UserError naming the backbones of a comma-separated list that timm does not know."""
    unknown = [b.strip() for b in names.split(",") if b.strip() and not timm.is_model(b.strip())]
    if unknown:
        raise UserError(f"unknown backbone(s) {unknown}; use timm model names (timm.list_models())")


def parse_class_weights(spec: str, num_classes: int) -> list[float] | None:
    """An explicit "3:1:1" as a list of floats; None for the schemes computed from the labels.

    Raises:
        UserError: not a scheme, not numbers, or not one per class.
    """
    if spec in ("none", "balanced", "ratio"):
        return None
    try:
        weights = [float(w) for w in str(spec).split(":")]
    except ValueError:
        weights = []
    if len(weights) != num_classes or min(weights, default=0) <= 0:
        raise UserError(f"class_weights {spec!r} must be 'none', 'balanced', 'ratio' or {num_classes} "
                        f"positive numbers joined by ':' (one per class, in class order)")
    return weights
