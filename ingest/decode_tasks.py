"""The decoding tasks' side of a decode into the cache, and the driver's checks of what they did.

A task decodes its chunk of files and writes the rows into the cache's `.npy` file itself when it
sees that file (`decode_chunk_into`), sending back a checksum of what it wrote; the driver reads
the rows back against it (`rewrite_lost_rows`: a file system that stages one copy per writer keeps
only the last writer's rows) and tries once more each file that failed for a reason outside it
(`retry_environment`).

Example:
    >>> result = decode_chunk_into((0, files), out="all.npy", offset=128, token=token, image_size=64, channels=1)
    >>> result["pixels"] is None, result["crc"]        # written here, and its checksum
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from ingest.image_file import decode_chunk
from ingest.stores import write_rows


def decode_chunk_into(chunk: tuple[int, list[str]], *, out: str, offset: int, token: str, **options) -> dict:
    """(a decoding task) `decode_chunk` of the files `chunk` (its first row, its files), their rows
    written straight into the `.npy` file `out` (pixels from byte `offset`) when this node sees that
    very file (`<out>.token` holds `token`: the same machine, or a shared file system): `pixels` is
    then None and `crc` the checksum of the rows written. Elsewhere, or when the write fails, the
    pixels go back to the driver as `decode_chunk` returns them."""
    first, files = chunk
    decoded = decode_chunk(files, **options)
    try:
        seen = Path(f"{out}.token").read_text()
    except OSError:
        seen = None
    if seen != token:
        return decoded
    row = options["image_size"] ** 2 * options["channels"]
    try:
        fd = os.open(out, os.O_WRONLY)
        try:
            write_rows(fd, offset + first * row, decoded["pixels"], decoded["results"])
        finally:
            os.close(fd)
    except OSError:  # seen but not writable here (a read-only mount): the driver writes them
        return decoded
    return {"pixels": None, "results": decoded["results"], "crc": zlib.crc32(decoded["pixels"].data)}


def rewrite_lost_rows(out: Path, handle, offset: int, row: int, chunks: list, results: list, written: dict,
                       options: dict) -> None:
    """Read back the rows each task wrote into `out` itself against the checksum it sent; the chunks
    whose rows did not arrive whole are decoded again here and written by the driver."""
    rows = np.load(out, mmap_mode="r")
    lost = []
    for k, crc in written.items():
        first = chunks[k][0]
        ok = [first + i for i, r in enumerate(results[k]) if "sha256" in r]
        if zlib.crc32(np.ascontiguousarray(rows[ok]).data) != crc:
            lost.append(k)
    del rows
    for k in lost:
        first, files = chunks[k]
        again = decode_chunk(files, **options)
        write_rows(handle.fileno(), offset + first * row, again["pixels"], again["results"])
    if lost:
        print(f"warning: the rows of {len(lost)} of {len(written)} decoding task(s) did not reach {out} whole (a file "
              f"system that keeps one writer's copy of a file?); decoded again and written by the driver", flush=True)


def retry_environment(files: list, flat: list[dict], options: dict, *, memory, write) -> None:
    """Decode once more each file that failed for a reason outside it (`environment`: reading it,
    memory, a missing decoder); the ones that now decode take their rows and results."""
    again = [i for i, r in enumerate(flat) if r.get("environment")]
    if not again:
        return
    retried = decode_chunk([str(files[i]) for i in again], **options)
    pixels = iter(retried["pixels"])
    for i, r in zip(again, retried["results"]):
        if "sha256" in r:
            image = next(pixels)
            if memory is not None:
                memory[i] = image
            else:
                write(i, image[None], r)
        flat[i] = r
