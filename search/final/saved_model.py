"""Model directories: the final model written by finalize and read back by `search.predict`,
without Ray.

A model directory holds `model.json` (members, their configs and weights in the ensemble, class
names, preprocessing, the decision threshold, library versions and the data fingerprint) and one
`.safetensors` file per trained network. Nothing is unpickled.

Example:
    >>> model = load_model("experiments/backbones-20261123-0100/final/ensemble")
    >>> table = predict_files(model, image_files(Path("new_xrays")))
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError
from search.outputs.calibration import apply_temperature
from search.outputs.evaluate import decide
from ingest.decoding import decode_images
from ingest.files import IMAGE_EXTENSIONS, files_under, unread_line
from trainables.models import build_model
from trainables.train import Preprocess, predict_proba

MODEL_FORMAT = "lung-search-model/1"


@dataclass
class SavedModel:
    """A loaded model directory: a weighted ensemble of members, each the mean of its seeds."""

    record: dict
    members: list[tuple[float, list]]  # (weight, [(network, preprocess), ...]) per member

    @property
    def class_names(self) -> list[str]:
        return self.record["class_names"]

    def predict_proba(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Calibrated class probabilities (N, classes) for uint8 images (N, size, size, channels): the
        members' weighted mean, scaled by the model's temperature."""
        total = 0.0
        for weight, networks in self.members:
            probs = np.mean([predict_proba(net, prep, images, batch_size=batch_size) for net, prep in networks], 0)
            total = total + weight * probs
        return apply_temperature(total, self.record.get("temperature", 1.0))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Labels at the model's threshold (see `search.outputs.evaluate.decide`)."""
        return decide(probs, self.class_names.index(self.record["positive_class"]), self.record["threshold"])


def save_model(folder: Path, record: dict, members: list[dict]) -> None:
    """Write a model directory. `record`: class_names, positive_class, threshold, preprocessing
    (image_size, channels), data, versions, ...; `members`: name, config, weight and `states` (one
    state dict per seed). Written beside and renamed into place, so a crash leaves no half model."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saved = []
    for m, member in enumerate(members):
        files = []
        for s, state in enumerate(member["states"]):
            files.append(f"member{m}_seed{s}.safetensors")
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / files[-1])
        saved.append({**{k: v for k, v in member.items() if k != "states"}, "files": files})
    (tmp / "model.json").write_text(json.dumps({"format": MODEL_FORMAT, **record, "members": saved}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_model(folder: str | Path, *, device: str = "cpu") -> SavedModel:
    """Load a model directory written by `save_model`.

    Raises:
        UserError: the folder is not a model directory, or its files are missing or unreadable.
    """
    folder = Path(folder).expanduser()
    meta = folder / "model.json"
    if not meta.is_file():
        raise UserError(f"{folder} is not a model directory (no model.json); use <experiment>/final/ensemble "
                        f"or a folder under <experiment>/final/members/, written by python -m search.finalize")
    try:
        record = json.loads(meta.read_text())
    except ValueError as exc:
        raise UserError(f"cannot read {meta}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise UserError(f"{meta} has format {found!r}; this version reads {MODEL_FORMAT!r}")
    try:
        return SavedModel(record, _members(folder, record, device))
    except (KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{meta} is incomplete ({type(exc).__name__}: {exc}); it was edited or cut short: "
                        f"write it again with python -m search.finalize") from None


def _members(folder: Path, record: dict, device: str) -> list:
    record["class_names"], record["positive_class"], record["threshold"]  # noqa: B018 (checked now, used later)
    pre = record["preprocessing"]
    members = []
    for member in record["members"]:
        config = {**member["config"], "weights": "random", "weights_dir": None}  # the files hold the weights
        networks = []
        for name in member["files"]:
            path = folder / name
            if not path.is_file():
                raise UserError(f"model directory {folder} lacks {name}; copy the whole folder")
            net = build_model(config, num_classes=len(record["class_names"]), in_chans=pre["channels"])
            try:
                net.load_state_dict(load_file(path))
            except Exception as exc:  # safetensors and torch raise several kinds for a bad file
                raise UserError(f"cannot load {path}: {str(exc)[:200]}") from None
            net.to(torch.device(device)).eval()
            prep = Preprocess(net, config["backbone"], channels=pre["channels"], image_size=pre["image_size"],
                              precision=config.get("precision", "auto"),
                              memory_format=config.get("memory_format", "auto"))
            networks.append((net.to(memory_format=torch.channels_last) if prep.channels_last else net, prep))
        members.append((member["weight"], networks))
    return members


def image_files(path: Path) -> list[Path]:
    """The images at `path`: the file itself, or every image under the folder (recursively).

    Raises:
        UserError: nothing there, or no image in the folder.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--images {str(path)!r} does not exist")
    files, unread = files_under(path)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}, or DICOM without an extension) under {path}"
                        + (f"; it holds {unread_line(unread)}" if unread else ""))
    if unread:
        print(f"left unread under {path}: {unread_line(unread)}", flush=True)
    return [Path(f) for f in files]


def predict_files(model: SavedModel, files: list[Path], *, root: Path | None = None,
                  skip_corrupt: bool = False) -> pd.DataFrame:
    """A table with one row per image: path (relative to `root`), each class probability, the
    predicted class. Images are decoded exactly as in training. With `skip_corrupt` an unreadable
    file gets a row with no probabilities and its reason in `error`, instead of failing them all.

    Raises:
        UserError: an unreadable file (without `skip_corrupt`), naming every one.
    """
    pre = model.record["preprocessing"]
    images, kept, errors = decode_images(files, image_size=pre["image_size"], channels=pre["channels"],
                                         ct_window=pre.get("ct_window", "lung"), skip_corrupt=skip_corrupt)
    probs = model.predict_proba(images) if len(images) else np.zeros((0, len(model.class_names)))
    names = model.class_names
    table = pd.DataFrame({"path": [str(f.relative_to(root)) if root else str(f) for f in kept]})
    for c, name in enumerate(names):
        table[f"p_{name}"] = probs[:, c]
    table["predicted"] = [names[k] for k in model.decide(probs)] if len(images) else []
    if errors:
        failed = pd.DataFrame({"path": [str(Path(f).relative_to(root)) if root else str(f) for f in errors],
                               "error": list(errors.values())})
        table = pd.concat([table.assign(error=""), failed], ignore_index=True)
    return table


def device_name(name: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, checked against what this machine has.

    Raises:
        UserError: an unknown device name, or CUDA asked for where none is visible.
    """
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return name
