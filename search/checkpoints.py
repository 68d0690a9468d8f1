"""The trial checkpoints Ray registered, read safely.

Ray copies a trial's checkpoint into `trial_<id>/checkpoint_0000NN/` before it registers it, and
keeps only the newest registered one; a copy cut short (a stop in mid-save, a lost node, a full
disk) leaves a folder Ray never names. A trial's `result.json` holds one line per result Ray
processed, each naming the checkpoint that came with it (`checkpoint_dir_name`): only those folders
are read, newest first, and one that will not load is named on the console and skipped; an
unregistered one that will not load (`torn`) is what a copy cut short leaves.

Example:
    >>> saved, path = newest_readable(Path("experiments/run1/trial_a2c44093"))
    >>> saved["folds"][0]["epoch"]
    8
"""
from __future__ import annotations

import json
from pathlib import Path

from trainables.trainable import CHECKPOINT_FILE, read_checkpoint


def results(trial: Path) -> list[dict]:
    """The trial's results as Ray recorded them in `result.json`, oldest first (a line cut short by
    a crash is left out)."""
    path = trial / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def registered(trial: Path) -> list[Path]:
    """The trial's checkpoint folders that Ray registered and that are still on disk, newest first."""
    names = {r["checkpoint_dir_name"] for r in results(trial) if r.get("checkpoint_dir_name")}
    return sorted((trial / name for name in names if (trial / name).is_dir()), reverse=True)


def unregistered(trial: Path) -> list[Path]:
    """The trial's `checkpoint_*` folders Ray never registered: copies cut short, or whole copies
    whose result never reached the driver. Nothing reads them."""
    named = set(registered(trial))
    return sorted(c for c in trial.glob("checkpoint_*") if c.is_dir() and c not in named)


def torn(trial: Path) -> list[Path]:
    """The trial's unregistered checkpoint folders whose file does not load: copies cut short. (A
    whole unregistered one stays: after a driver was killed, `result.json`, which Ray syncs into
    storage every few seconds, can lag behind a checkpoint Ray did register.)"""
    return [c for c in unregistered(trial) if read_checkpoint(c / CHECKPOINT_FILE)[0] is None]


def newest_readable(trial: Path) -> tuple[dict | None, Path | None]:
    """The newest registered checkpoint of the trial that loads, and its file; (None, None) when
    there is none. Each one that does not load is named in one warning line."""
    for folder in registered(trial):
        saved, why = read_checkpoint(folder / CHECKPOINT_FILE)
        if saved is not None:
            return saved, folder / CHECKPOINT_FILE
        print(f"warning: checkpoint {folder / CHECKPOINT_FILE} cannot be read ({why}); skipped", flush=True)
    return None, None
