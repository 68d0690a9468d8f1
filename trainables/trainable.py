"""The trainable: one function of `(config, data)` that Ray Tune runs for each trial.

    tuner = tune.Tuner(tune.with_parameters(train_classifier, data=dataset), param_space=config)

Each epoch it reports validation `val_auc`, `val_acc`, `val_f1`, `val_loss` (plus train loss,
learning rate, timings and model size) with a checkpoint that ASHA, resume and retries use. With
`config["folds"]` K > 1 it trains the K folds of train+val side by side and reports their mean
(and `val_*_std`, the spread over folds) each epoch, so ASHA judges the cross-validated score.

A checkpoint that cannot be read on resume or retry (torn by a crash, a full disk) is not trusted:
the trial trains again from epoch 0, silently, to that checkpoint's epoch, and reports on from there,
so the epochs Ray has seen stay unique and increasing; the next report names the file
(`checkpoint_unreadable`), which the driver prints.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from ingest.dataset import Dataset
from core.choices import METRIC_MODES
from trainables.train import Training

CHECKPOINT_FILE = "checkpoint.pt"


def train_classifier(config: dict, data: Dataset, *, cores=None) -> None:
    """Train `config` on `data` (its train split, or its K folds); report validation metrics and a
    checkpoint per epoch. `cores`: an actor whose `get(trial_id)` gives the threads this trial may
    use from its next epoch on (None: the CPUs it asked for); each epoch reports the `threads` it ran."""
    folds = int(config.get("folds", 1))
    runs = ([Training(config, data, train=train, val=held_out) for train, held_out in data.cv_folds(folds, config["seed"])]
            if folds > 1 else [Training(config, data)])
    unreadable = _resume(runs, tune.get_checkpoint())
    node_id = ray.get_runtime_context().get_node_id()  # which node ran each epoch (retries may move it)
    # the CPUs the trial holds, not torch's default: a set OMP_NUM_THREADS (which Ray then leaves alone) would
    # have every trial run that many threads on its share of the cores
    own = max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    trial_id = tune.get_context().get_trial_id()
    for per_fold, threads in with_threads(zip(*(run.epochs() for run in runs)), cores, trial_id, own):
        metrics = {**fold_mean(per_fold), "node_id": node_id, "threads": threads}
        if unreadable:
            metrics["checkpoint_unreadable"], unreadable = unreadable, None
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"folds": [run.state_dict() for run in runs], "metrics": metrics}, Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def read_checkpoint(path: Path, *, map_location="cpu") -> tuple[dict | None, str]:
    """A trial checkpoint file as saved above and "", or None and why it cannot be read (missing, torn,
    not this format): any failure means the checkpoint is absent, nothing read from it is trusted."""
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(saved, dict) or not isinstance(saved.get("folds"), list) or not saved["folds"]:
            return None, "not a trial checkpoint"
        return saved, ""
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError... for a torn file
        return None, _first_sentence(exc)


def _resume(runs: list[Training], checkpoint) -> str | None:
    """Load Ray's checkpoint into `runs`; when it cannot be read, train them again silently to its
    epoch (checkpoint_0000NN holds epoch NN + 1: a trial saves one every epoch) and return a line
    naming the file."""
    if not checkpoint:
        return None
    path = Path(checkpoint.path) / CHECKPOINT_FILE
    try:
        with checkpoint.as_directory() as folder:
            saved, why = read_checkpoint(Path(folder) / CHECKPOINT_FILE, map_location=runs[0].device)
    except Exception as exc:  # the folder itself is gone or cannot be fetched
        saved, why = None, _first_sentence(exc)
    if saved is not None:
        for run, state in zip(runs, saved["folds"]):
            run.load_state_dict(state)
        return None
    epoch = int(path.parent.name.rsplit("_", 1)[-1]) + 1
    for _ in zip(*(run.epochs(until=epoch) for run in runs)):
        pass
    return f"{path} cannot be read ({why}): trained again from epoch 0 to its epoch {epoch}"


def _first_sentence(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__


def allowed_threads(cores, key: str, own: int) -> int:
    """The threads the `cores` actor allows `key` now; `own` (the CPUs it asked for) when it names
    none, when there is no actor, or when the actor is lost: sharing idle cores must never fail a run."""
    if cores is None:
        return own
    try:
        return ray.get(cores.get.remote(key), timeout=30) or own
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return own


def with_threads(epochs, cores, key: str, own: int):
    """Each epoch of the iterator `epochs` with the threads it ran on: before each, torch gets the threads
    the `cores` actor allows `key` then (`allowed_threads`), so idle cores shared out reach a running trial."""
    while True:
        threads = allowed_threads(cores, key, own)
        torch.set_num_threads(threads)
        epoch = next(epochs, None)
        if epoch is None:
            return
        yield epoch, threads


def fold_mean(per_fold: tuple[dict, ...]) -> dict:
    """One epoch of K folds as one report: the validation metrics and train loss averaged, the
    validation metrics' spread (`<metric>_std`), timings summed. One fold is reported as it is."""
    if len(per_fold) == 1:
        return dict(per_fold[0])
    out = {**per_fold[0], "folds": len(per_fold)}
    for key in (*METRIC_MODES, "train_loss"):
        values = [m[key] for m in per_fold]
        out[key] = float(np.mean(values))
        if key in METRIC_MODES:
            out[f"{key}_std"] = float(np.std(values))
    for key in ("train_seconds", "eval_seconds"):
        out[key] = float(sum(m[key] for m in per_fold))
    return out
