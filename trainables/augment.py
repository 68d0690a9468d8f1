"""Batched augmentation on the training device: one random affine per image, in a single
`grid_sample` call, plus flips and brightness/contrast jitter.

Example:
    >>> x = torch.rand(8, 1, 32, 32)
    >>> augment_batch(x, "heavy", torch.Generator().manual_seed(0)).shape
    torch.Size([8, 1, 32, 32])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# rotate: degrees (+-); shift and zoom: fractions of the side; jitter: brightness/contrast (+-).
# "heavy" is the classic InceptionV3 CT recipe: rotation 360, shifts 0.2, zoom 0.2, both flips.
LEVELS = {
    "none": None,
    "light": dict(rotate=10, shift=0.05, zoom=0.05, hflip=True, vflip=False, jitter=0.0),
    "medium": dict(rotate=20, shift=0.1, zoom=0.1, hflip=True, vflip=False, jitter=0.1),
    "heavy": dict(rotate=360, shift=0.2, zoom=0.2, hflip=True, vflip=True, jitter=0.2),
}


def augment_batch(x: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch (B, C, H, W) in [0, 1]; `generator` makes it repeatable."""
    p = LEVELS[level]
    if p is None:
        return x
    b = x.shape[0]

    def uniform(low, high):
        return torch.rand(b, generator=generator).mul_(high - low).add_(low).to(x.device)

    angle = uniform(-p["rotate"], p["rotate"]) * (math.pi / 180)
    zoom = uniform(1 - p["zoom"], 1 + p["zoom"])
    fx = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if p["hflip"] else torch.ones(b, device=x.device)
    fy = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if p["vflip"] else torch.ones(b, device=x.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * fx, -sin * fy, uniform(-2 * p["shift"], 2 * p["shift"])], 1),
        torch.stack([sin * fx, cos * fy, uniform(-2 * p["shift"], 2 * p["shift"])], 1),
    ], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if p["jitter"]:
        contrast = uniform(1 - p["jitter"], 1 + p["jitter"]).view(b, 1, 1, 1).to(x.dtype)
        brightness = uniform(-p["jitter"] / 2, p["jitter"] / 2).view(b, 1, 1, 1).to(x.dtype)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + brightness).clamp_(0, 1)
    return x
