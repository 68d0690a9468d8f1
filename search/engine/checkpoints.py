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
import shutil
from pathlib import Path

from core.formatting import size
from core.errors import UserError
from trainables.models import num_params
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


def checkpoint_sizes(backbones, folds: int) -> tuple[float, float]:
    """The largest and the mean size in bytes of one trial checkpoint over `backbones`: `folds` x the
    backbone's weights and Adam's two moments, float32."""
    sizes = [12 * num_params(b) * folds for b in backbones]
    return max(sizes), sum(sizes) / len(sizes)


def check_free_space(storage: Path, *, sizes: tuple[float, float], num_samples: int, slots: int) -> str:
    """A line comparing the free space of `storage` with what the search's checkpoints take (`sizes`
    from `checkpoint_sizes`): one per trial until finalize removes the unused ones.

    Raises:
        UserError: not even the checkpoints of the first trials at once fit.
    """
    largest, typical = sizes
    free = _free(storage)
    if free < in_hand(largest, slots):
        raise UserError(f"{storage} has {size(free)} free; the first {slots} trials' checkpoints alone take up to "
                        f"{size(in_hand(largest, slots))} ({size(largest)} each): free space there, or choose "
                        f"another --storage")
    need = num_samples * typical
    line = (f"storage: {size(free)} free under {storage}; this search's checkpoints take about {size(need)} "
            f"({num_samples} trials x {size(typical)}; finalize removes the unused ones)")
    return line if free >= need else (f"warning: {line}: the disk may fill up; the search then stops before it is "
                                      f"full, and --resume goes on once there is room")


def in_hand(largest: float, slots: int) -> float:
    """The space a search keeps free to write what it has whole: two checkpoints per running trial (Ray
    swaps the newest in before it removes the last) and a few MB of state and leaderboards."""
    return slots * 2 * largest + 2 * 2 ** 20


def low_space(storage: Path, reserve: float):
    """For `search.engine.tuner.fit`: a function that names the shortage once `storage` has less than
    `reserve` bytes free, else returns None."""
    def check() -> str | None:
        free = _free(storage)
        if free < reserve:
            return (f"{storage} has {size(free)} free, less than the {size(reserve)} the search keeps in hand to "
                    f"write its checkpoints and state whole: it stopped with everything written so far")
        return None
    return check


def _free(storage: Path) -> int:
    return shutil.disk_usage(next(p for p in (storage, *storage.parents) if p.exists())).free


def remove_torn(folder: Path) -> None:
    """Remove the checkpoint folders a stop cut short. Ray kills a trial that does not stop within
    10 s of being told, mid-epoch or mid-copy of its checkpoint into storage (issue 42); once the
    Tuner has returned no trial writes, and a torn file beside the real checkpoint misleads any reader
    that takes the newest folder."""
    removed = [c for trial in sorted(folder.glob("trial_*")) for c in torn(trial)]
    for c in removed:
        shutil.rmtree(c)
    if removed:
        print(f"removed {len(removed)} checkpoint folder(s) the stop cut short (Ray never registered them): "
              f"{', '.join(f'{c.parent.name}/{c.name}' for c in removed)}", flush=True)


def stand_in_for_lost(folder: Path) -> list[Path]:
    """Make again, empty, each checkpoint folder that Ray's newest saved state names as an unfinished
    trial's latest and that is gone, so that `Tuner.restore` gives the trial a checkpoint it cannot
    read (it then trains again to that epoch: trainables/trainable.py) instead of failing it. Ray keeps
    one checkpoint per trial: a driver killed after Ray registered a newer one, and deleted this one,
    but before it saved its state leaves that state naming a deleted folder."""
    states = sorted(folder.glob("experiment_state-*.json"))
    made = []
    for trial, run in json.loads(states[-1].read_text())["trial_data"] if states else []:
        trial, run = json.loads(trial), json.loads(run)
        name = (run.get("last_result") or {}).get("checkpoint_dir_name")
        path = folder / f"trial_{trial['trial_id']}" / str(name)
        if name and trial.get("status") != "TERMINATED" and not path.exists():
            path.mkdir(parents=True)
            made.append(path)
            print(f"warning: {path} is gone (a driver stopped between Ray deleting it and saving its state): "
                  f"trial {trial['trial_id']} trains again to that checkpoint's epoch", flush=True)
    return made
