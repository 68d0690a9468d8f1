"""Saliency on a planted shortcut: real X-rays whose labels are random, except that every image of
class 1 carries a bright square in its top-left corner. The only way to tell the classes apart is
the square, so a model that learned the task must look there, and Grad-CAM must say so."""
import numpy as np
from PIL import Image

from search.final.saliency import grad_cam, overlay
from search.final.saved_model import SavedModel
from ingest.dataset import Dataset, load_dataset
from trainables.train import Training

SIZE, MARK = 64, 14


def _planted(pneumonia_npz) -> Dataset:
    real = load_dataset(pneumonia_npz, image_size=SIZE, subset=200)
    keep = np.flatnonzero(real.split != 255)
    rng = np.random.default_rng(0)
    images, labels = real.images[keep].copy(), rng.integers(0, 2, len(keep))
    images[labels == 1, :MARK, :MARK] = 255
    return Dataset(images=images, labels=labels, class_names=["plain", "marked"], split=real.split[keep], groups=None,
                   paths=None, fingerprint="planted", source="planted", split_kind="given")


def test_grad_cam_points_at_a_planted_marker(pneumonia_npz):
    data = _planted(pneumonia_npz)
    run = Training({"backbone": "small_cnn", "weights": "random", "image_size": SIZE, "max_epochs": 8, "batch_size": 16,
                    "lr": 1e-3, "augment": "none"}, data)
    last = list(run.epochs())[-1]
    assert last["val_acc"] > 0.95  # it learned the marker
    model = SavedModel({"class_names": data.class_names, "positive_class": "marked", "threshold": 0.5},
                       [(1.0, [(run.model, run.prep)])])
    images, labels = data.arrays("test")
    marked = images[labels == 1][:16]
    maps = grad_cam(model, marked, np.ones(len(marked), int))
    assert maps.shape == marked.shape[:3] and np.allclose(maps.max((1, 2)), 1)
    inside = maps[:, :MARK + 4, :MARK + 4].mean()
    outside = maps[:, SIZE // 2:, SIZE // 2:].mean()  # the far quadrant
    assert inside > 3 * outside, (inside, outside)
    picture = overlay(marked[0], maps[0])
    assert picture.shape == (256, 256, 3) and picture.dtype == np.uint8
    Image.fromarray(picture)  # a valid RGB image
