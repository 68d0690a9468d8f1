"""Shared fixtures: the real data in ../shared/data (or $SHARED_DATA), image folders made from it, and
one local Ray of 2 CPUs for the searches run in this process.

The suite gives the same outcome on any machine: no test sees a GPU (CUDA_VISIBLE_DEVICES is empty),
model hubs are offline with empty caches (a weight file a machine downloaded earlier is not found),
in-process searches run on 2 CPUs whatever the cores, and Ray's temporary files go to a folder
removed at the end. Set here, before any test module imports torch, timm or huggingface_hub; the
commands the tests start inherit them.
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
TEMP = tempfile.mkdtemp(prefix="lung-tests-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
os.environ.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_HOME=f"{TEMP}/hf", HF_HUB_CACHE=f"{TEMP}/hf/hub",
                  TORCH_HOME=f"{TEMP}/torch", RAY_TMPDIR=TEMP, LUNG_SEARCH_CACHE=f"{TEMP}/cache")
RAY_CPUS = 2


@pytest.fixture(autouse=True)
def local_ray(request):
    """The searches a test runs in this process join one local Ray of `RAY_CPUS` CPUs, started once
    (and again after a test that needed its own); a test marked `own_ray` starts none of it and may
    start or join what it needs."""
    import ray
    if request.node.get_closest_marker("own_ray"):
        if ray.is_initialized():
            ray.shutdown()
        yield
        if ray.is_initialized():
            ray.shutdown()
        return
    if not ray.is_initialized():
        ray.init(num_cpus=RAY_CPUS, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield


def pytest_sessionfinish(session, exitstatus):
    import ray
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(TEMP, ignore_errors=True)


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
