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
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import numpy as np

from core.errors import UserError


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, named for no other writer, flushed to the disk,
    then renamed into place: a reader, or a crash at any point, sees the old file or the new one whole.
    (Not `tempfile.mkstemp`: its file is readable by its owner only, and `write` keeps that mode.)"""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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


def write_timings(folder: Path, clock: dict, *, slots: int, cpus_per_trial: float) -> None:
    """timings.json: where this command's wall time went, and how the trial slots were used
    (bench/overhead.py reads it)."""
    now = time.time()
    search_ended = clock.get("search_ended", now)
    epochs = [json.loads(line) for path in sorted(folder.glob("trial_*/result.json"))
              for line in path.read_text().splitlines() if line.strip()]
    steps = [(e.get("train_seconds", 0) + e.get("eval_seconds", 0), e.get("threads", cpus_per_trial)) for e in epochs]
    write_json(folder / "timings.json", {
        **clock, "ended": now, "trial_slots": slots,
        "before_fit_seconds": clock["fit_started"] - clock["started"],
        "fit_seconds": clock["fit_ended"] - clock["fit_started"],
        "after_fit_seconds": search_ended - clock["fit_ended"],
        "finalize_seconds": now - search_ended, "search_seconds": search_ended - clock["started"],
        # the precision / layout each backbone trained at ("auto": measured, trainables/execution.py), per input size
        "execution": {f"{e['config']['backbone']} {e['input_size']}px": e["execution"] for e in epochs
                      if "execution" in e and "input_size" in e and "backbone" in e.get("config", {})},
        "slot_use": {"trial_epochs": len(epochs),
                     "epochs_on_shared_cores": sum(threads > cpus_per_trial for _, threads in steps),
                     "step_seconds": sum(seconds for seconds, _ in steps),
                     "core_seconds_in_steps": sum(seconds * threads / cpus_per_trial for seconds, threads in steps)}})


def cut_torn_tail(path: Path) -> None:
    """Cut a last line that a crash (or a full disk) left without its end from the journal, keeping
    the cut bytes in `<journal>.torn`: Optuna skips such a line when it is last, but the next append
    would land on it and make the whole journal unreadable."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        path.with_name(path.name + ".torn").write_bytes(data[keep:])
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    print(f"warning: {path} ended in a line cut short ({len(data) - keep} bytes, kept in {path.name}.torn); "
          f"cut off before appending", flush=True)
