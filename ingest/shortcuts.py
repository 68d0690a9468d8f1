"""The shortcut probe: can a quick model tell the label from what the files are rather than what they show?

Two probes, each a logistic regression cross-validated by patient (by image where no patient is known),
scored by the AUC of its out-of-fold predictions:

- **acquisition**: properties that cannot be the disease: format, colour mode and bit depth, width,
  height and aspect, a JPEG's compression setting (the mean of its luminance quantization table), and
  where a DICOM header says so the manufacturer, scanner model, station and view. When it predicts the
  label (AUC >= SHORTCUT_AUC) a model may have learned the hospital, not the disease (DeGrave et al.,
  Nature Machine Intelligence 2021), and the audit warns.
- **image**: what the image itself carries: brightness and contrast, of the whole and of its corners
  (where text and markers sit), and the file's bytes per pixel. These can be the disease (opacity
  brightens a lung and adds texture, which a compressed file pays for in bytes: PneumoniaMNIST images
  saved alike as JPEG tell pneumonia by their size at AUC 0.91) or the acquisition (an exposure, a
  burnt-in label, another export): reported beside the saliency maps, never as a shortcut.

Example:
    >>> probe = shortcut_probe(data)          # a Dataset from ingest.dataset.load_dataset
    >>> probe["acquisition"]["auc"], probe["acquisition"]["shortcut"], probe["image"]["auc"]
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ingest.dataset import Dataset

SHORTCUT_AUC = 0.7   # the acquisition probe at or above this is a shortcut
CATEGORICAL = ("format", "mode", "manufacturer", "model", "station", "view")
RARE = 5             # categorical values with fewer images are pooled as "other"
CORNER = 0.125       # the corners' side, a share of the image's
FOLDS = 5


def shortcut_probe(data: Dataset, used: np.ndarray) -> dict:
    """Both probes on the images `used` (indices into `data`): per probe the out-of-fold AUC (None
    where it cannot be measured), its features, and the properties that alone predict the label best."""
    y, groups = data.labels[used], (data.groups[used] if data.groups is not None else None)
    out = {}
    acquisition = _acquisition_features(data, used)
    for name, (features, names) in (("acquisition", acquisition), ("image", _image_features(data, used))):
        auc = _cross_validated_auc(features, y, groups) if features is not None and features.shape[1] else None
        strongest = _strongest(features, names, y) if auc is not None else []
        out[name] = {"auc": None if auc is None else round(auc, 4), "features": names, "strongest": strongest,
                     "shortcut": name == "acquisition" and auc is not None and auc >= SHORTCUT_AUC}
    out["grouped_by"] = "patient" if groups is not None else "image"
    return out


def _acquisition_features(data: Dataset, used: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    if data.file_infos is None:  # arrays from a .npz: one pipeline made every image, no file to read
        return None, []
    infos = [data.file_infos[i] for i in used]
    sizes = np.array([[float(v) for v in info["size"].split("x")] for info in infos])  # width, height
    columns, names = [np.log(sizes[:, 0]), np.log(sizes[:, 1]), np.log(sizes[:, 0] / sizes[:, 1])], \
        ["width", "height", "aspect"]
    if any("jpeg_quantization" in info for info in infos):
        columns.append(np.array([info.get("jpeg_quantization", 0.0) for info in infos]))
        names.append("JPEG quantization")
    for key in CATEGORICAL:
        values = [str(info.get(key, "")) for info in infos]
        common = [v for v, n in Counter(values).most_common() if n >= RARE]
        if len(set(values)) < 2 or not common:
            continue
        for value in common[:8]:
            columns.append(np.array([v == value for v in values], float))
            names.append(f"{key} = {value or '(none)'}")
    return np.column_stack(columns), names


def _image_features(data: Dataset, used: np.ndarray) -> tuple[np.ndarray, list[str]]:
    rows, names = [], ["brightness", "contrast", "corner brightness", "corner contrast"]
    for start in range(0, len(used), 1024):  # a disk store is read a block at a time
        x = np.asarray(data.images[np.sort(used[start:start + 1024])], np.float32).mean(-1)  # (n, H, W)
        order = np.argsort(np.argsort(used[start:start + 1024]))
        x = x[order]
        side = max(1, int(x.shape[1] * CORNER))
        corners = np.concatenate([x[:, :side, :side], x[:, :side, -side:], x[:, -side:, :side], x[:, -side:, -side:]], 1)
        rows.append(np.column_stack([x.mean((1, 2)), x.std((1, 2)), corners.mean((1, 2)), corners.std((1, 2))]))
    features = np.concatenate(rows)
    infos = [data.file_infos[i] for i in used] if data.file_infos is not None else []
    if infos and all("bytes" in info for info in infos):
        pixels = np.array([np.prod([float(v) for v in info["size"].split("x")]) for info in infos])
        features = np.column_stack([features, np.log(np.array([info["bytes"] for info in infos]) / pixels)])
        names.append("bytes per pixel")
    return features, names


def _cross_validated_auc(features: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> float | None:
    """The AUC (one-vs-rest macro for 3+ classes) of a logistic regression's out-of-fold predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    fewest = min(Counter(y.tolist()).values()) if len(y) else 0
    units = fewest if groups is None else min(len(np.unique(groups[y == c])) for c in np.unique(y))
    folds = min(FOLDS, units)
    if len(np.unique(y)) < 2 or folds < 2:
        return None
    split = StratifiedGroupKFold(folds, shuffle=True, random_state=0) if groups is not None \
        else StratifiedKFold(folds, shuffle=True, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probs = cross_val_predict(model, features, y, cv=split, groups=groups, method="predict_proba")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def _strongest(features: np.ndarray, names: list[str], y: np.ndarray, top: int = 3) -> list[dict]:
    """The features that alone separate the classes best: the AUC of each value as a score for its most
    separable class against the rest (0.5: none; 1.0: it gives the label away)."""
    from sklearn.metrics import roc_auc_score
    scores = []
    for column, name in zip(features.T, names):
        if np.ptp(column) == 0:
            continue
        auc = max(max(a, 1 - a) for a in (roc_auc_score(y == c, column) for c in np.unique(y)))
        scores.append({"property": name, "auc": round(float(auc), 3)})
    return sorted(scores, key=lambda s: -s["auc"])[:top]
