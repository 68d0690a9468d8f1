"""The trainable: one function of `(config, data)` that Ray Tune runs for each trial.

    tuner = tune.Tuner(tune.with_parameters(train_classifier, data=dataset), param_space=config)

Each epoch it reports validation `val_auc`, `val_acc`, `val_f1`, `val_loss` (plus train loss,
learning rate, timings and model size) with a checkpoint that ASHA, resume and retries use.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from trainables.data import Dataset
from trainables.train import Training

CHECKPOINT_FILE = "checkpoint.pt"


def train_classifier(config: dict, data: Dataset) -> None:
    """Train `config` on `data`'s train split; report validation metrics and a checkpoint per epoch."""
    run = Training(config, data)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            run.load_state_dict(torch.load(Path(folder) / CHECKPOINT_FILE, map_location=run.device,
                                           weights_only=True))
    node_id = ray.get_runtime_context().get_node_id()  # which node ran each epoch (retries may move it)
    for metrics in run.epochs():
        metrics["node_id"] = node_id
        with tempfile.TemporaryDirectory() as folder:
            torch.save({**run.state_dict(), "metrics": metrics}, Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
