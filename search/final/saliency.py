"""Where a model looks: Grad-CAM (Selvaraju et al., 2017, by captum) on the last feature stage of
every network of a saved model, combined by the ensemble weights, and overlaid on the images. This
is how a reader sees whether a model looks at the lungs or at a text marker, a device or a border.

Example:
    >>> maps = grad_cam(load_model("final/ensemble"), images, targets)    # (N, H, W) in [0, 1]
    >>> Image.fromarray(overlay(images[0], maps[0])).save("scan-0.png")
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from matplotlib import colormaps
from PIL import Image

from search.final.saved_model import SavedModel

DISPLAY = 256  # side of a written overlay: the decoded images can be 28 px


def grad_cam(model: SavedModel, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (N, H, W), each scaled to a maximum of 1, of class `targets[i]` on uint8
    `images` (N, H, W, C): per network of the model, averaged over a member's networks (seeds,
    folds), then weighted by the members' ensemble weights."""
    total = np.zeros(images.shape[:3])
    for weight, networks in model.members:
        total += weight * np.mean([_network_cam(net, prep, images, targets, batch_size) for net, prep in networks], 0)
    return _scaled(total)


def _network_cam(net, prep, images: np.ndarray, targets: np.ndarray, batch_size: int) -> np.ndarray:
    cam = LayerGradCam(net, net.backbone.get_submodule(net.backbone.feature_info[-1]["module"]))
    maps = []
    for start in range(0, len(images), batch_size):
        x = prep(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))).requires_grad_(True)
        target = torch.as_tensor(targets[start:start + batch_size], device=x.device)
        attribution = cam.attribute(x, target=target, relu_attributions=True)
        maps.append(F.interpolate(attribution.float(), size=images.shape[1:3], mode="bilinear",
                                  align_corners=False)[:, 0].detach().cpu().numpy())
    return _scaled(np.concatenate(maps))


def _scaled(maps: np.ndarray) -> np.ndarray:
    top = maps.reshape(len(maps), -1).max(1)
    return maps / np.where(top > 0, top, 1)[:, None, None]


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The image (H, W, C uint8) in gray with the map in the jet colour scale on top, RGB uint8 of
    DISPLAY x DISPLAY pixels."""
    gray = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    gray = np.asarray(gray.resize((DISPLAY, DISPLAY), Image.BILINEAR), np.float32)
    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((DISPLAY, DISPLAY), Image.BILINEAR))
    colour = colormaps["jet"](heat / 255.0)[..., :3] * 255
    return np.clip((1 - alpha) * gray + alpha * colour, 0, 255).astype(np.uint8)


def write_overlays(model: SavedModel, images: np.ndarray, targets: np.ndarray, names: list[str], folder: Path) -> None:
    """One overlay per image, `folder/<name>.png` (sub-folders as in `names`)."""
    for name, image, cam in zip(names, images, grad_cam(model, images, targets)):
        path = folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay(image, cam)).save(path)


def file_name(class_name: str) -> str:
    """`saliency_<class>.png`, the class name made safe for a file name."""
    return f"saliency_{re.sub(r'[^A-Za-z0-9._-]+', '_', class_name)}.png"
