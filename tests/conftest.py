"""Shared fixtures: the real data in ../shared/data (or $SHARED_DATA), image folders made from it, and
one local Ray of 2 CPUs for the searches run in this process.

The suite gives the same outcome on any machine: no test sees a GPU (CUDA_VISIBLE_DEVICES is empty),
model hubs are offline with empty caches (a weight file a machine downloaded earlier is not found),
in-process searches run on 2 CPUs whatever the cores, and Ray's temporary files go to a folder
removed at the end. Set here, before any test module imports torch, timm or huggingface_hub; the
commands the tests start inherit them.
"""
import json
import os
import shutil
import subprocess
import sys
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


@pytest.fixture(scope="session")
def keras_folder(tmp_path_factory, png_folder):
    """The PNG X-rays in Keras' flow_from_directory layout: train/ and validation/, no test/."""
    root = tmp_path_factory.mktemp("keras")
    for cls in sorted(d for d in png_folder.iterdir() if d.is_dir()):
        for k, image in enumerate(sorted(cls.iterdir())):
            target = root / ("validation" if k % 5 == 0 else "train") / cls.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target / image.name)
    return root


@pytest.fixture(scope="session")
def experiment(tmp_path_factory, keras_folder):
    """A tiny search whose end runs finalize: 2 distinct configurations x 2 seeds, and the ensemble;
    no warm restart, so a member's first seed is its trial's network as it stands. Logged to MLflow."""
    from search.run import run_search
    from search.options import SearchOptions
    storage = tmp_path_factory.mktemp("exp")
    folder = run_search(SearchOptions(space="tiny", data=str(keras_folder), storage=str(storage), name="pipeline", folds=1, stop_rule=False,
                                      num_samples=4, max_epochs=3, grace_period=3, image_size=28, seed=0,
                                      cpus_per_trial=1, top_k=2, seeds=2, warm_restart="none", mlflow="experiment"))
    return folder, json.loads((folder / "final" / "metrics.json").read_text())


def run_cli(module, *args):
    """`python -m module args`; search.predict runs with Ray made unimportable, as on a machine without it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", module, *args]
    if module == "search.predict":
        command = [sys.executable, "-c", "import runpy, sys; sys.modules['ray'] = None; sys.argv[0] = 'predict'; "
                                         "runpy.run_module('search.predict', run_name='__main__')", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def run_in_process(module, capsys, *args):
    """`module.main(args)` in this process, as the command line calls it: each error test runs its
    first case as the real command (`run_cli`) and the rest here, without a new Python's start-up."""
    import importlib
    capsys.readouterr()
    code = importlib.import_module(module).main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def one_error(result, message):
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
