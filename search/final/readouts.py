"""What the report shows, computed while finalize writes `final/`: its figures (ROC curves, confusion
matrix, calibration, the search's progress and training curves), Grad-CAM saliency maps, the external
sets' read-out, the hyperparameters' importances, and the predictions tables. `search.final.report`'s
sections call these (see `SECTIONS` there).

Example:
    >>> f = Finalized(folder, summary, models, board, tmp, data, externals=[], positive=1, members=members)
    >>> shown = saliency_maps(f)                    # saliency_<class>.png, and which test images they show
    >>> predictions_table(data, "test", data.indices("test"), models["ensemble-fitted"]).head()
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.choices import METRIC_MODES
from ingest.dataset import Dataset
from search.data.external_sets import External
from search.engine.tuner import STUDY_FILE, load_study
from search.final.external import evaluate_external, file_stem
from search.final.importance import importances
from search.final.saliency import file_name, grad_cam, overlay
from search.final.saved_model import load_model
from search.outputs.evaluate import decide
from search.outputs.plots import (plot_calibration, plot_confusion, plot_external_roc, plot_importance, plot_progress,
                                  plot_roc, plot_saliency, plot_training_curves)


@dataclass
class Scored:
    """A search's final models as scored: `summary` is what metrics.json holds, `models` the scored
    members and ensembles, `board` the leaderboard."""

    folder: Path
    summary: dict
    models: dict
    board: pd.DataFrame

    @property
    def chosen(self) -> dict:
        return self.models[self.summary["chosen"]]

    @property
    def metric(self) -> str:
        return self.summary["search"]["options"]["metric"]


@dataclass
class Finalized(Scored):
    """What finalize holds when it writes `final/` (being written in `tmp`): what a section computes from."""

    tmp: Path
    data: Dataset
    externals: list[External]
    positive: int
    members: list[dict]


def predictions_table(data: Dataset, split: str, idx: np.ndarray, model: dict) -> pd.DataFrame:
    """One row per image of `split` (`idx` its rows of `data`): path, label, each class's probability, the decision."""
    names, labels = data.class_names, data.labels[idx]
    probs = model[f"{split}_probs"]
    table = pd.DataFrame({"index": np.arange(len(labels))})
    if data.paths is not None:
        table["path"] = [data.paths[i] for i in idx]
    table["label"] = [names[k] for k in labels]
    for c, name in enumerate(names):
        table[f"p_{name}"] = probs[:, c]
    positive = names.index(model["test"]["positive_class"])
    table["predicted"] = [names[k] for k in decide(probs, positive, model["val"]["threshold"])]
    return table


def saliency_maps(f: Finalized, *, per_row: int = 4) -> dict:
    """`saliency_<class>.png` per class: Grad-CAM of the final model (as saved) for that class on
    its most confident correct test images and its most confident errors (images of another class
    it called this one). Returns, per class, the file and the test indices shown."""
    tmp, data, model, positive = f.tmp, f.data, f.chosen, f.positive
    saved = load_model(tmp / "ensemble")
    images, labels = data.arrays("test")
    probs = model["test_probs"]
    said = decide(probs, positive, model["val"]["threshold"])
    shown = {}
    for c, name in enumerate(data.class_names):
        rows = {}
        for row, pick in (("most confident correct", (labels == c) & (said == c)),
                          ("most confident errors", (labels != c) & (said == c))):
            idx = np.flatnonzero(pick)
            rows[row] = idx[np.argsort(-probs[idx, c], kind="stable")][:per_row]
        picked = np.concatenate(list(rows.values())).astype(int)
        cams = dict(zip(picked.tolist(), grad_cam(saved, images[picked], np.full(len(picked), c)))) if len(picked) else {}
        panels = {row: [(overlay(images[i], cams[i]), f"#{i}: {data.class_names[labels[i]]}, p={probs[i, c]:.2f}")
                        for i in idx] for row, idx in rows.items()}
        plot_saliency(panels, f"where the final model looks when it says {name} (Grad-CAM)", tmp / file_name(name))
        shown[name] = {"file": file_name(name), **{row.replace(" ", "_"): idx.tolist() for row, idx in rows.items()}}
    return shown


def external_readout(f: Finalized) -> list[dict]:
    """The saved final model (as `search.predict` loads it) on each external set: its read-out,
    `external_<set>_predictions.csv`, and `external_roc.png` beside the internal test's curve."""
    tmp, externals, data, model, positive = f.tmp, f.externals, f.data, f.chosen, f.positive
    resamples = f.summary["finalize_options"]["bootstrap"]
    if not externals:
        return []
    saved, names = load_model(tmp / "ensemble"), data.class_names
    curves = [("internal test", data.arrays("test")[1] == positive, model["test_probs"][:, positive], model["test"])]
    out = []
    for ext in externals:
        figures, probs = evaluate_external(saved, ext, internal=model["test"], resamples=resamples)
        read = {"test_probs": probs, "val": model["val"], "test": {"positive_class": names[positive]}}
        predictions_table(ext.data, "test", ext.data.indices("test"), read).to_csv(
            tmp / f"external_{file_stem(ext.name)}_predictions.csv", index=False)
        curves.append((ext.name, ext.data.labels == positive, probs[:, positive], figures))
        out.append(figures)
    plot_external_roc(curves, names[positive], tmp / "external_roc.png")
    return out


def importance_of_search(f: Finalized) -> dict | None:
    """fANOVA importances over the search's study (None without one), and `importance.png` where it has values."""
    found = importances(load_study(f.folder)) if (f.folder / STUDY_FILE).is_file() else None
    if found and found["values"]:
        plot_importance(found["values"], f.board, f.metric, f.tmp / "importance.png")
    return found


def roc_curves(f: Finalized) -> None:
    plot_roc(f.models, f.summary["chosen"], f.data.arrays("test")[1], f.data.class_names, f.positive, f.tmp / "roc.png")


def confusion(f: Finalized) -> None:
    plot_confusion(f.chosen["test"]["confusion_matrix"], f.data.class_names, f.summary["chosen"],
                   f.tmp / "confusion_matrix.png")


def reliability(f: Finalized) -> None:
    plot_calibration(f.data.arrays("test")[1], f.chosen["uncalibrated_test_probs"], f.chosen["test_probs"],
                     f.chosen["temperature"], f.summary["chosen"], f.tmp / "calibration.png")


def search_curves(f: Finalized) -> None:
    """`search_progress.png` (the search's trials over time) and `training_curves.png` (the members' epochs)."""
    plot_training_curves(f.folder, f.board, f.members, f.metric, f.tmp / "training_curves.png")
    plot_progress(f.board, f.tmp / "search_progress.png", metric=f.metric, mode=METRIC_MODES[f.metric],
                  name=f.folder.name)
