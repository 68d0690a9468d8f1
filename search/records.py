"""The files the stages hand over: written atomically (a crash never leaves half a file), read
back with a clear error, and stamped with the library versions that made them.

Example:
    >>> write_json(folder / "metrics.json", {"auc": 0.97})
    >>> record = read_search_record(folder)      # search_config.json of an experiment
"""
from __future__ import annotations

import json
import os
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np

from trainables import UserError


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file beside `path` and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    """`data` as indented JSON, atomically; numpy values become plain numbers and lists."""
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, default=plain)))


def plain(value):
    """JSON's fallback for what it cannot write itself."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def read_search_record(folder: Path) -> dict:
    """`search_config.json` of the experiment at `folder`: its options, data and versions.

    Raises:
        UserError: the folder is missing, is not an experiment, or its record is unreadable.
    """
    path = folder / "search_config.json"
    if not folder.is_dir():
        raise UserError(f"experiment folder {folder} does not exist")
    if not path.is_file():
        raise UserError(f"{folder} is not an experiment folder (no search_config.json); pass the folder "
                        f"python -m search.run printed as 'experiment:'")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def versions() -> dict:
    """Python, the libraries that shape a result, the platform and CUDA, read without importing Ray."""
    import torch
    libraries = {name: version(name) for name in ("timm", "ray", "optuna", "scikit-learn")}
    return {"python": platform.python_version(), "torch": torch.__version__, **libraries,
            "platform": platform.platform(), "cuda": torch.version.cuda}
