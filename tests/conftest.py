"""Shared fixtures: the real data in ../shared/data (or $SHARED_DATA), and image folders made from it."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"real test data missing: {path} (set SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    return shared("pneumoniamnist", "pneumoniamnist.npz")


@pytest.fixture(scope="session")
def png_folder(tmp_path_factory, pneumonia_npz) -> Path:
    """Real PneumoniaMNIST X-rays written as grayscale PNGs of varied sizes, in class folders whose
    names have spaces: 120 images per class."""
    arrays = np.load(pneumonia_npz)
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for label, name in enumerate(["normal lung", "viral pneumonia"]):
        folder = root / name
        folder.mkdir()
        idx = np.flatnonzero(arrays["train_labels"].ravel() == label)[:120]
        for k, i in enumerate(idx):
            size = int(rng.integers(28, 90))
            Image.fromarray(arrays["train_images"][i]).resize((size, size + k % 7)).save(folder / f"x ray {k}.png")
    return root
