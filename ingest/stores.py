"""Where decoded images live: in memory, or in a `.npy` file on disk (the disk store) that the
decoding writes row by row and a trial reads row by row (memory-mapped) or the driver reads whole.

Example:
    >>> handle, offset = npy_for_rows(Path("all.npy"), (1000, 64, 64, 1))    # zeros, rows written later
    >>> images = DiskImages("all.npy")            # pickles as its path: Ray hands trials the handle
    >>> rows(images, np.array([3, 1])).shape      # read when sliced
    (2, 64, 64, 1)
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.errors import UserError

STORES = ("memory", "disk")


class DiskImages:
    """uint8 images (N, S, S, C) in a `.npy` file, read row by row as asked (memory-mapped).
    Pickles as its path, so Ray hands a trial the handle, not the pixels; indexing returns the
    rows asked for as an ordinary array."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._rows = None

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return self._rows

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self.rows[key])

    def __reduce__(self):
        return DiskImages, (self.path,)


class Rows:
    """The images `images[index]`, read only when sliced: a split of the disk store, whose rows a
    trial reads batch by batch. `len`, slicing and integer-array indexing, like an array."""

    def __init__(self, images, index: np.ndarray):
        self.images, self.index = images, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.images.shape[1:])

    def __getitem__(self, key) -> np.ndarray:
        return self.images[self.index[key]]


def rows(images, index: np.ndarray):
    """`images[index]`: copied into memory for in-memory images, a `Rows` view of the disk store."""
    return images[index] if isinstance(images, np.ndarray) else Rows(images, index)


def write_rows(fd: int, start: int, pixels: np.ndarray, results: list[dict]) -> None:
    """A chunk's decoded rows into the file `fd` from byte `start`, in file order: the row of its
    i-th file at `start + i * row`; rows of unreadable files stay zero (dropped later)."""
    ok = [i for i, r in enumerate(results) if "sha256" in r]
    row = pixels[0].nbytes if len(pixels) else 0
    if len(ok) == len(results):  # the whole chunk: one write
        _pwrite_all(fd, pixels.tobytes(), start)
        return
    for i, image in zip(ok, pixels):
        _pwrite_all(fd, image.tobytes(), start + i * row)


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def read_npy(path: Path, *, threads: int = 4, block: int = 16 << 20) -> np.ndarray:
    """A `.npy` file of a plain array read whole into memory by a few threads at once: a virtual
    disk serves parallel reads several times faster than one sequential stream (819 MB not in the
    page cache: 2.9 s in one stream, 0.5 s in four, on the 2-core machine of BENCHMARKS.md)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if fortran_order or dtype.hasobject:
        return np.load(path)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if not nbytes:
        return np.empty(shape, dtype)
    # anonymous memory of our own rather than np.empty: numpy asks the kernel for huge pages, and on a machine
    # whose memory is fragmented the first touch of them stalls in compaction (819 MB: up to 2.1 s, 0.3 s without)
    array = np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape)
    buffer = memoryview(array.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY)

    def read(start: int) -> None:
        view, at = buffer[start:start + block], offset + start
        while view:
            n = os.preadv(fd, [view], at)
            if n == 0:
                raise UserError(f"{path} is shorter than its header says (truncated); remove it and run again")
            view, at = view[n:], at + n

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(0, len(buffer), block)))
    finally:
        os.close(fd)
    return array


def npy_for_rows(path: Path, shape: tuple[int, ...]):
    """An open `.npy` file of uint8 `shape` (zeros, not yet written to disk) and the byte offset of its first row."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = array.offset
    del array
    return open(path, "r+b"), offset


def copy_rows(src: Path, dst: Path, keep: np.ndarray, block: int = 4096) -> None:
    """The rows of `src` where `keep`, into `dst`, a block at a time (never the whole array in memory)."""
    source = np.load(src, mmap_mode="r")
    handle, offset = npy_for_rows(dst, (int(keep.sum()), *source.shape[1:]))
    with handle:
        handle.seek(offset)
        for start in range(0, len(keep), block):
            handle.write(np.ascontiguousarray(source[start:start + block][keep[start:start + block]]).tobytes())
    del source
