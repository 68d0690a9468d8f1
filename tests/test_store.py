"""The data paths: decoded images in memory or on disk (the cache), the cache reused by a later
search and keyed so that edited files are new data, the fingerprint of the content, and a search
joined to a Ray head that `ray start` started with token authentication and a small object store."""
import errno
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
from core.errors import UserError
from search.options import SearchOptions, check_search
from ingest.dataset import load_dataset
import torch

from ingest.decoding import Decoding, decode_files
from ingest.stores import DiskImages
from trainables.train import Training, read_batches


def test_the_disk_store_trains_on_the_same_batches_as_memory_and_ships_a_handle(png_folder, tmp_path):
    memory = load_dataset(png_folder, image_size=32, cache=str(tmp_path), store="memory")
    disk = load_dataset(png_folder, image_size=32, cache=str(tmp_path), store="disk")
    assert not memory.store["reused"] and disk.store["reused"] and disk.store["store"] == "disk"
    assert isinstance(disk.images, DiskImages) and np.array_equal(disk.images[np.arange(len(disk.labels))], memory.images)
    assert len(pickle.dumps(disk)) < len(pickle.dumps(memory)) / 4  # Ray ships the path, not the pixels
    config = {"backbone": "small_cnn", "weights": "random", "image_size": 32, "batch_size": 16, "max_epochs": 2,
              "augment": "light"}
    on_disk = Training(config, disk)
    assert not hasattr(on_disk.train_x, "device")  # the train split stays on disk: rows read per batch
    by_memory = [(e["train_loss"], e["val_auc"]) for e in Training(config, memory).epochs()]
    by_disk = [(e["train_loss"], e["val_auc"]) for e in on_disk.epochs()]
    assert by_memory == by_disk
    # the GPU's way of reading them: DataLoader worker processes, here on the CPU
    batches = [torch.randperm(len(on_disk.train_y))[:8] for _ in range(6)]
    by_workers, in_process = read_batches(on_disk.train_x, batches, workers=2), read_batches(on_disk.train_x, batches)
    assert all(torch.equal(a, b) for a, b in zip(by_workers, in_process))


def test_decoding_prints_its_progress_and_hashes_the_bytes(png_folder, capsys):
    files = sorted(png_folder.rglob("*.png"))
    decoded = decode_files(files, png_folder, Decoding(image_size=16, channels=1, progress_every=0))
    assert "decoding: " in capsys.readouterr().out and decoded.keep.all()
    assert decoded.infos[0]["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()[:32]
    assert decoded.infos[0]["format"] == "PNG" and decoded.infos[0]["mode"] == "L"


def test_a_quiet_search_still_prints_each_running_trials_epoch(tmp_path, capsys):
    from types import SimpleNamespace
    from search.engine.leaderboard import LeaderboardCallback
    board = LeaderboardCallback(tmp_path, metric="val_auc", mode="max", num_samples=4, time_budget=None,
                                scheduler=None, print_every=0)
    trials = [SimpleNamespace(trial_id="a1", status="RUNNING", config={"backbone": "resnet50"},
                              last_result={"training_iteration": 2}),
              SimpleNamespace(trial_id="b2", status="PENDING", config={"backbone": "small_cnn"}, last_result={})]
    board.on_trial_start(0, trials, trials[0])
    board.on_step_end(1, trials)
    line = capsys.readouterr().out
    assert "0/4 done" in line and "in progress: a1 resnet50 epoch 3 for 0:00" in line and "b2" not in line


def test_an_edited_image_of_the_same_size_is_new_data_and_is_decoded_again(png_folder, tmp_path):
    folder = tmp_path / "bmp"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for k in range(12):
            Image.fromarray(np.full((20, 20), 10 * k, np.uint8)).save(folder / name / f"{k}.bmp")
    first = load_dataset(folder, image_size=16, cache=str(tmp_path / "cache"))
    again = load_dataset(folder, image_size=16, cache=str(tmp_path / "cache"))
    assert again.store["reused"] and again.fingerprint == first.fingerprint
    edited = folder / "a" / "3.bmp"
    size = edited.stat().st_size
    time.sleep(0.01)
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(edited)
    assert edited.stat().st_size == size  # same size: a fingerprint of paths and sizes would not see it
    after = load_dataset(folder, image_size=16, cache=str(tmp_path / "cache"))
    assert not after.store["reused"] and after.fingerprint != first.fingerprint
    assert load_dataset(folder, image_size=16).fingerprint == after.fingerprint  # the content, with or without a cache
    assert load_dataset(folder, image_size=20, cache=str(tmp_path / "cache")).store["reused"] is False  # other options


def test_data_store_options_fail_with_one_clear_line(tmp_path, png_folder):
    with pytest.raises(UserError, match="unknown data store 'ssd'; choose one of auto, memory, disk"):
        check_search(SearchOptions(data_store="ssd"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--data-cache .*file.* is a file; give a folder"):
        check_search(SearchOptions(data_cache=str(tmp_path / "file")))
    with pytest.raises(UserError, match="--ct-window must be one of lung, mediastinum, file, or 'centre,width'"):
        check_search(SearchOptions(ct_window="soft tissue"))
    with pytest.raises(UserError, match="the disk data store needs a cache folder"):
        load_dataset(png_folder, image_size=16, store="disk")
    with pytest.raises(UserError, match="unknown data store 'tape'"):
        load_dataset(png_folder, image_size=16, store="tape")


def test_a_half_written_cache_entry_is_never_reused(png_folder, tmp_path, monkeypatch):
    import ingest.decoding as decoding

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(decoding, "copy_rows", broken)
    (png_folder / "normal lung" / "broken.png").write_bytes(b"not a png")  # forces the copy of the kept rows
    try:
        with pytest.raises(OSError, match="disk full"):
            load_dataset(png_folder, image_size=16, cache=str(tmp_path), skip_corrupt=True)
        assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # the temporary folder went with the failure
        monkeypatch.undo()
        with pytest.warns(UserWarning, match="left out 1 unreadable image"):
            data = load_dataset(png_folder, image_size=16, cache=str(tmp_path), skip_corrupt=True)
        assert not data.store["reused"] and len(data.labels) == 240
    finally:
        (png_folder / "normal lung" / "broken.png").unlink()


def _entries(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_decode_cache_costs_one_warning_and_the_images_decode_into_memory(png_folder, pneumonia_npz, tmp_path,
                                                                                  monkeypatch, capsys):
    """A stand-in for a full disk: every write of decoded rows fails as a full file system does (ENOSPC),
    in the decoding tasks and in the driver; for a .npz, the entry's completion does."""
    import ingest.decode_tasks as tasks
    import ingest.decoding as decoding
    monkeypatch.setattr(tasks, "write_rows", _no_space)
    monkeypatch.setattr(decoding, "write_rows", _no_space)
    monkeypatch.setattr(decoding, "place", _no_space)
    expected = load_dataset(png_folder, image_size=16)
    capsys.readouterr()
    for store in ("memory", "disk"):
        data = load_dataset(png_folder, image_size=16, cache=str(tmp_path), store=store)
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "cannot be written (No space left on device): decoding into memory" in warnings[0]
        assert not data.on_disk and data.store["store"] == "memory"
        assert np.array_equal(data.images, expected.images) and _entries(tmp_path) == []
    data = load_dataset(pneumonia_npz, image_size=28, cache=str(tmp_path), store="disk")
    assert "keeping the images in memory" in capsys.readouterr().out and not data.on_disk


def test_a_read_only_decode_cache_is_read_where_it_holds_the_entry_and_skipped_where_not(png_folder, tmp_path,
                                                                                         monkeypatch, capsys):
    """A stand-in for a read-only mount: the cache's lock cannot be opened (EROFS), as on a shared cache
    that a cluster's nodes may only read."""
    import ingest.decoding as decoding
    first = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "shared"))
    monkeypatch.setattr(decoding, "key_lock", lambda *a: _raises(OSError(errno.EROFS, "Read-only file system")))
    capsys.readouterr()
    again = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "shared"), store="disk")
    out = capsys.readouterr().out
    assert "cannot be written (Read-only file system): reading the entry it already holds" in out
    assert again.on_disk and again.store["reused"] and np.array_equal(np.asarray(again.images[:]), first.images)
    fresh = load_dataset(png_folder, image_size=24, cache=str(tmp_path / "shared"))
    assert "decoding into memory" in capsys.readouterr().out and not fresh.store["reused"]
    assert fresh.images.shape[1:] == (24, 24, 1) and _entries(tmp_path / "shared") == [first.store["cache"].split("/")[-1]]


def _raises(exc):
    raise exc


def test_a_failure_outside_the_file_is_tried_again_and_never_kept(png_folder, tmp_path, monkeypatch, capsys):
    """An I/O error reading one file (a network share's hiccup): tried once more at the end of the
    decode. Once: the file decodes and the entry is kept whole. Every time: the search may go on
    without it (--skip-corrupt), but the cache keeps nothing, and the next search decodes it."""
    import pathlib
    flaky, calls, read = png_folder / "normal lung" / "x ray 5.png", [], pathlib.Path.read_bytes

    def read_bytes(path, failures):
        if path == flaky:
            calls.append(path)
            if len(calls) <= failures:
                raise OSError(5, "Input/output error")
        return read(path)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda path: read_bytes(path, 1))
    once = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "once"))
    assert len(calls) == 2 and len(once.labels) == 240 and _entries(tmp_path / "once") == [Path(once.store["cache"]).name]
    calls.clear()
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda path: read_bytes(path, 99))
    with pytest.raises(UserError, match=r"1 image\(s\) could not be read: .*x ray 5.png \(OSError"):
        load_dataset(png_folder, image_size=16, cache=str(tmp_path / "always"))
    with pytest.warns(UserWarning, match="left out 1 unreadable image"):
        without = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "always"), skip_corrupt=True)
    assert len(without.labels) == 239 and "failed twice for a reason outside them" in capsys.readouterr().out
    assert _entries(tmp_path / "always") == []  # nothing kept, no temporary folder left
    monkeypatch.undo()
    later = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "always"))
    assert not later.store["reused"] and len(later.labels) == 240
    assert np.array_equal(later.images, once.images)


def test_rows_a_task_wrote_but_the_file_system_lost_are_found_and_written_again(png_folder, tmp_path, capsys):
    """A file system that keeps one writer's copy of a file (gcsfuse, s3fs) loses the rows other tasks
    wrote: here the rows of every second task are zeroed once it reports. The driver reads each task's
    rows back against its checksum and writes the lost ones itself."""
    from ingest.decoding import _threads, chunk_size

    def last_writer_wins(fn, chunks, kwargs):
        for k, result in _threads(fn, chunks, kwargs):
            if k % 2 and result["pixels"] is None:
                rows = np.load(kwargs["out"], mmap_mode="r+")
                first, files = chunks[k]
                rows[first:first + len(files)] = 0
                rows.flush()
                del rows
            yield k, result
    lossy = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "a"), store="disk", run_chunks=last_writer_wins)
    out = capsys.readouterr().out
    assert "did not reach" in out and f"{240 // chunk_size(240) // 2} of {240 // chunk_size(240)} decoding task(s)" in out
    memory = load_dataset(png_folder, image_size=16)
    assert np.array_equal(lossy.images[np.arange(240)], memory.images)


def test_a_damaged_cache_entry_is_found_by_its_checksums_and_decoded_again(png_folder, tmp_path, capsys):
    first = load_dataset(png_folder, image_size=16, cache=str(tmp_path))
    entry = Path(first.store["cache"])
    rows = np.load(entry / "images.npy", mmap_mode="r+")
    rows[1500 % len(rows)] = 255 - rows[1500 % len(rows)]  # a bit rot, or a lost write, after the entry was placed
    rows.flush()
    del rows
    again = load_dataset(png_folder, image_size=16, cache=str(tmp_path))
    assert "cannot be used (rows 0-239 changed since they were written); decoding again" in capsys.readouterr().out
    assert not again.store["reused"] and np.array_equal(again.images, first.images)
    assert load_dataset(png_folder, image_size=16, cache=str(tmp_path)).store["reused"]
    assert _entries(tmp_path) == [entry.name]  # the damaged copy is gone, no temporary folder left


_DECODE = """
import sys, time
from pathlib import Path
from ingest.dataset import load_dataset
from ingest.decoding import _threads
folder, cache, started = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def slow(fn, chunks, kwargs):  # the first search decodes for 5 s: the second starts meanwhile
    started.touch()
    time.sleep(5)
    yield from _threads(fn, chunks, kwargs)
data = load_dataset(folder, image_size=16, cache=cache, run_chunks=None if started.exists() else slow)
print("REUSED" if data.store["reused"] else "DECODED", data.fingerprint)
"""


def test_two_searches_of_the_same_new_data_share_one_decode(png_folder, tmp_path):
    cache, started = tmp_path / "cache", tmp_path / "started"
    command = [sys.executable, "-c", _DECODE, str(png_folder), str(cache), str(started)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out_first = first.communicate(timeout=120)[0]
    assert "another search is decoding these files" in second.stdout and second.returncode == 0, second.stderr[-2000:]
    assert out_first.splitlines()[-1].startswith("DECODED") and second.stdout.splitlines()[-1].startswith("REUSED")
    assert out_first.split()[-1] == second.stdout.split()[-1]  # the same fingerprint
    assert len(_entries(cache)) == 1


def test_tasks_write_their_rows_into_the_cache_and_a_task_elsewhere_sends_them_back(png_folder, tmp_path):
    from ingest.image_file import decode_chunk
    from ingest.stores import npy_for_rows
    from ingest.decode_tasks import decode_chunk_into
    files = sorted(str(p) for p in png_folder.rglob("*.png"))[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    chunk = files[:3] + [str(broken)] + files[3:]
    expected = decode_chunk(chunk, image_size=16, channels=1)
    out = tmp_path / "all.npy"
    handle, offset = npy_for_rows(out, (10, 16, 16, 1))
    handle.close()
    (tmp_path / "all.npy.token").write_text("this-decoding")
    elsewhere = decode_chunk_into((2, chunk), out=str(out), offset=offset, token="another", image_size=16, channels=1)
    assert np.array_equal(elsewhere["pixels"], expected["pixels"]) and not np.load(out).any()  # sent back, not written
    here = decode_chunk_into((2, chunk), out=str(out), offset=offset, token="this-decoding", image_size=16, channels=1)
    assert here["pixels"] is None and here["results"] == expected["results"]
    rows = np.load(out)
    assert np.array_equal(rows[[2, 3, 4, 6, 7, 8]], expected["pixels"])  # each file's row, in file order
    import zlib
    assert here["crc"] == zlib.crc32(expected["pixels"].tobytes())  # what the driver reads back against
    unwritable = tmp_path / "mount"  # seen (the token matches) but not writable: the pixels go to the driver
    unwritable.mkdir()
    (tmp_path / "mount.token").write_text("this-decoding")
    sent = decode_chunk_into((2, chunk), out=str(unwritable), offset=offset, token="this-decoding", image_size=16,
                             channels=1)
    assert np.array_equal(sent["pixels"], expected["pixels"]) and "crc" not in sent
    assert not rows[[0, 1, 5, 9]].any()  # the unreadable file's row and rows of other chunks: untouched

    # a whole decoding whose tasks all ran where the file is not seen: the driver writes every row
    def elsewhere_only(fn, chunks, kwargs):
        return ((k, fn(c, **{**kwargs, "token": "another"})) for k, c in enumerate(chunks))
    (png_folder / "normal lung" / "broken.png").write_bytes(b"x")
    try:
        with pytest.warns(UserWarning, match="left out 1 unreadable"):
            by_driver = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "a"), store="disk",
                                     skip_corrupt=True, run_chunks=elsewhere_only)
        with pytest.warns(UserWarning, match="left out 1 unreadable"):
            by_tasks = load_dataset(png_folder, image_size=16, cache=str(tmp_path / "b"), store="disk",
                                    skip_corrupt=True)
    finally:
        (png_folder / "normal lung" / "broken.png").unlink()
    assert len(by_tasks.labels) == 240 and np.array_equal(by_driver.images[np.arange(240)], by_tasks.images[np.arange(240)])
    assert not list((tmp_path / "b").rglob("*.token"))


def test_read_npy_reads_what_np_load_reads_and_names_a_truncated_file(tmp_path):
    from ingest.stores import read_npy
    for shape, dtype in (((1000, 7, 3), np.uint8), ((0, 4), np.uint8), ((333,), np.float32)):
        array = np.random.default_rng(0).integers(0, 255, shape).astype(dtype)
        np.save(tmp_path / "a.npy", array)
        read = read_npy(tmp_path / "a.npy", block=1000)  # many blocks, the last one short
        assert read.dtype == array.dtype and np.array_equal(read, array)
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-10])
    with pytest.raises(UserError, match="a.npy is shorter than its header says"):
        read_npy(tmp_path / "a.npy", block=1000)


def _ray(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def token_head(tmp_path):
    """A Ray head started by `ray start --head` as a user starts one, with a token on this machine
    (so Ray turns token authentication on) and an 80 MB object store; stopped afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    assert _ray("get-auth-token", "--generate", env=env).returncode == 0
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    port = 6300 + os.getpid() % 500
    started = _ray("start", "--head", f"--port={port}", "--num-cpus=2", "--object-store-memory=80000000",
                   "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", env=env)
    assert started.returncode == 0, started.stderr
    assert "Token authentication is enabled" in started.stdout + started.stderr
    yield f"127.0.0.1:{port}", env
    subprocess.run(["pkill", "-9", "-f", temp])
    shutil.rmtree(temp, ignore_errors=True)


def test_a_search_joins_a_ray_start_head_with_tokens_and_takes_the_disk_store_when_the_store_is_small(
        token_head, png_folder, tmp_path):
    address, env = token_head
    run = subprocess.run([sys.executable, "-m", "search.run", "--address", address, "--no-stop-rule", "--space", "tiny", "--backbones",
                          "small_cnn", "--data", str(png_folder), "--image-size", "448", "--data-store", "auto",
                          "--num-samples", "1", "--max-epochs", "1", "--folds", "1", "--subset", "10", "--weights",
                          "random", "--no-finalize", "--storage", str(tmp_path), "--name", "joined",
                          # a fixed execution: measuring the fastest at 448 px would take most of the test's minute
                          "--precision", "fp32", "--memory-format", "contiguous"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # 240 images x 448 x 448 = 48 MB decoded, more than half of the head's 80 MB object store
    assert "data store: disk (--data-store auto): the decoded images take 48.2 MB" in run.stdout
    board = pd.read_csv(tmp_path / "joined" / "leaderboard.csv")
    assert list(board["status"]) == ["TERMINATED"] and board["val_auc"].notna().all()
    assert (tmp_path / "data-cache").is_dir()


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path, png_folder):
    run = subprocess.run([sys.executable, "-m", "search.run", "--address", "127.0.0.1:9", "--data", str(png_folder),
                          "--storage", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: cannot join a Ray cluster at --address 127.0.0.1:9" in run.stderr


@pytest.mark.own_ray  # "auto" finds any Ray running on this machine, the tests' own too
def test_address_auto_with_no_cluster_running_is_one_line(tmp_path, png_folder):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "search.run", "--address", "auto", "--data", str(png_folder),
                          "--storage", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(errors) == 1 and errors[0].startswith("error: cannot join a Ray cluster at --address auto: Could not "
                                                     "find any running Ray instance"), run.stderr[-2000:]
    assert ".." not in errors[0]


UNWRITABLE = """import builtins, errno, io, os
_root, _kind = os.path.realpath(os.environ["UNWRITABLE_ROOT"]), os.environ["UNWRITABLE_KIND"]
_code = errno.ENOSPC if _kind == "full" else errno.EROFS
_open, _io_open, _os_open, _pwrite, _write = builtins.open, io.open, os.open, os.pwrite, os.write
_mkdir, _rename, _replace = os.mkdir, os.rename, os.replace


def _inside(path):
    if isinstance(path, int):
        path = os.readlink(f"/proc/self/fd/{path}")
    return os.path.realpath(os.fsdecode(path)).startswith(_root)


def _refuse(path):
    raise OSError(_code, os.strerror(_code), os.fsdecode(path) if not isinstance(path, int) else None)


def _writes(mode):
    return any(c in str(mode) for c in "wax+")


def open_(file, mode="r", *args, **kwargs):
    if _writes(mode) and not isinstance(file, int) and _inside(file):
        _refuse(file)
    return _io_open(file, mode, *args, **kwargs)


def pwrite(fd, data, at):
    return _refuse(fd) if _inside(fd) else _pwrite(fd, data, at)


def write(fd, data):
    return _refuse(fd) if fd > 2 and _inside(fd) else _write(fd, data)


def os_open(path, flags, *args, **kwargs):  # a full disk still makes files; a read-only one does not
    if _kind == "read-only" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path):
        _refuse(path)
    return _os_open(path, flags, *args, **kwargs)


def mkdir(path, *args, **kwargs):
    if _kind == "read-only" and _inside(path):
        _refuse(path)
    return _mkdir(path, *args, **kwargs)


def rename(src, dst, *args, **kwargs):
    if _kind == "read-only" and _inside(src):
        _refuse(src)
    return _rename(src, dst, *args, **kwargs)


builtins.open = io.open = open_
os.pwrite, os.write, os.open, os.mkdir, os.rename = pwrite, write, os_open, mkdir, rename
"""


def _search_with_cache(folder, data, cache, tmp_path, name, kind=None):
    """A small search of `data` through the decode cache `cache`; `kind` "full" or "read-only" makes the
    cache folder act as a full or read-only file system in every process of the search (a
    `sitecustomize`: data written there fails with ENOSPC, or anything written with EROFS; no mount,
    so any user runs it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind:
        (tmp_path / "unwritable").mkdir(exist_ok=True)
        (tmp_path / "unwritable" / "sitecustomize.py").write_text(UNWRITABLE)
        env.update(PYTHONPATH=f"{tmp_path / 'unwritable'}:{ROOT}", UNWRITABLE_ROOT=str(cache.resolve()),
                   UNWRITABLE_KIND=kind)
    return subprocess.run([sys.executable, "-m", "search.run", "--space", "tiny", "--backbones", "small_cnn", "--data",
                           str(data), "--image-size", "28", "--data-store", "disk", "--data-cache", str(cache),
                           "--num-samples", "1", "--max-epochs", "1", "--folds", "1", "--no-stop-rule", "--no-finalize",
                           "--storage", str(folder), "--name", name], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_search_whose_decode_cache_is_full_or_read_only_ends_with_one_warning_naming_it(png_folder, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for kind, instead in (("full", "decoding into memory"), ("read-only", "reading the entry it already holds")):
        if kind == "read-only":  # the entry a search of the same files and size wrote before
            load_dataset(png_folder, image_size=28, cache=str(cache), store="disk")
        run = _search_with_cache(tmp_path / "runs", png_folder, cache, tmp_path, kind, kind)
        out = run.stdout + run.stderr
        assert run.returncode == 0 and "Traceback" not in out, out[-3000:]
        board = pd.read_csv(tmp_path / "runs" / kind / "leaderboard.csv")
        assert list(board["status"]) == ["TERMINATED"], board
        warnings = [line for line in out.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"warning: the decode cache {cache} cannot be written") and instead in warnings[0]
        if kind == "full":
            assert _entries(cache) == [] and not list(cache.glob(".*.tmp-*")), list(cache.iterdir())
