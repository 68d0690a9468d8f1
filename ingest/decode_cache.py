"""The decode cache's entries: one lock per key, written whole and fsynced before they are renamed
into place, and checked against their own record (size, a checksum per block of rows) when read.

An entry `<cache>/<key>/` holds `images.npy` and `files.json`. Entries are never changed once in
place: every entry of a key holds the same rows, so a search that reads one while another search
replaces a damaged copy reads the same images. Two searches of the same files take turns on
`<cache>/.<key>.lock`: the first decodes, the second waits and reuses its entry.

Example:
    >>> with key_lock(cache, key):
    ...     record = whole_entry(cache / key)       # None: absent, half-written or damaged
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

BLOCK_ROWS = 1024  # rows per checksum
# the packages whose versions decide what a file decodes to: a cache made by other versions is not reused
DECODERS = ("numpy", "pillow", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
            "python-gdcm")


def decoder_versions() -> dict[str, str]:
    """The installed versions of DECODERS (the absent ones left out)."""
    found = {}
    for name in DECODERS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@contextmanager
def key_lock(cache: Path, key: str):
    """Hold `<cache>/.<key>.lock` (filelock: an flock on POSIX, which NFS v4 honours too); says so when
    another search holds it and waits for it."""
    cache.mkdir(parents=True, exist_ok=True)
    lock = FileLock(cache / f".{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"decoded images: another search is decoding these files into {cache / key}; waiting for it", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fresh_folder(folder: Path) -> Path:
    """An empty temporary folder beside `folder`, named for no other writer (any node, any process)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    return tmp


def block_checksums(images: np.ndarray) -> list[int]:
    """crc32 of each block of BLOCK_ROWS rows (a memory-mapped array is read a block at a time)."""
    return [zlib.crc32(np.ascontiguousarray(images[k:k + BLOCK_ROWS]).data) for k in range(0, len(images), BLOCK_ROWS)]


def place(tmp: Path, folder: Path, record: dict) -> None:
    """Finish the entry in `tmp` (`images.npy` written): its record with the rows' checksums, every
    file fsynced, then renamed to `folder` in one step. A damaged entry already there is moved aside
    first (its readers keep the files they opened)."""
    images = np.load(tmp / "images.npy", mmap_mode="r")
    record = {**record, "shape": list(images.shape), "block_rows": BLOCK_ROWS, "checksums": block_checksums(images)}
    del images
    with open(tmp / "files.json", "w") as f:
        json.dump(record, f)
    for path in (tmp / "images.npy", tmp / "files.json", tmp):
        _fsync(path)
    if folder.exists():
        aside = folder.with_name(f".{folder.name}.damaged-{uuid.uuid4().hex[:12]}")
        folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    tmp.rename(folder)
    _fsync(folder.parent)


def whole_entry(folder: Path) -> tuple[dict | None, str]:
    """The entry's record and "" when it is whole (its record, its file's shape and every block's
    checksum agree); else None and what is wrong ("" when there is no entry)."""
    try:
        record = json.loads((folder / "files.json").read_text())
    except FileNotFoundError:
        return None, ("no record (a decode cut short)" if folder.exists() else "")
    except (OSError, ValueError) as exc:
        return None, f"its record cannot be read ({type(exc).__name__})"
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        return None, f"images.npy cannot be read ({str(exc)[:80]})"
    if "checksums" not in record:
        return None, "its record has no checksums (an older cache)"
    if list(images.shape) != record.get("shape"):
        return None, f"images.npy holds {list(images.shape)}, its record says {record.get('shape')}"
    for k, (found, kept) in enumerate(zip(block_checksums(images), record.get("checksums", []))):
        if found != kept:
            first = k * record["block_rows"]
            return None, f"rows {first}-{min(first + record['block_rows'], len(images)) - 1} changed since they were written"
    return record, ""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
