"""How a list of files becomes decoded images, fingerprinted by their content and cached.

Files are decoded in chunks (`decode_chunk`) by `run_chunks`: local threads by default, Ray tasks
spread over the cluster when the search passes them (`search.data.search_data`). The same pass hashes every
file's bytes, so the data's fingerprint is its content. Decoded images go to memory, or, with a
`cache` folder, into `<cache>/<key>/images.npy` (uint8, N x S x S x C) beside `files.json`, where
`key` is the file list (path, size, modification and change time), the decoding options and the
decoders' versions: a later search of the same files reads them back instead of decoding again
(ingest.decode_cache: one decode per key at a time, entries written whole and checked when read). A
decoding task that sees that file (the same machine, or a shared file system) writes its rows into
it itself, and the driver reads them back against the task's checksum (a file system that keeps one
writer's copy loses the others' rows); elsewhere, or where it cannot write, its pixels come back to
the driver, which writes them. A file that failed for a reason outside it (reading it, memory, a
missing decoder) is tried once more at the end, and a decode that still has such a failure is not
kept for later searches. On the disk store (`ingest.stores`) trials get a
`DiskImages` handle to that file and read the rows they need (memory-mapped: the page cache keeps
one copy per node), never a whole split.

Example:
    >>> decoded = decode_files(files, root, Decoding(image_size=64, channels=1, cache=Path("cache"), store="disk"))
    >>> decoded.images[np.array([3, 1])].shape      # rows read from disk
    (2, 64, 64, 1)
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from core.formatting import clock
from core.errors import UserError
from ingest.decode_cache import decoder_versions, fresh_folder, key_lock, place, whole_entry
from ingest.decode_tasks import decode_chunk_into, retry_environment, rewrite_lost_rows
from ingest.files import listing, relative_paths
from ingest.image_file import decode_chunk
from ingest.stores import STORES, DiskImages, copy_rows, npy_for_rows, read_npy, write_rows

DECODER_VERSION = 3  # bump when a decoding rule changes: caches of older rules are then not reused
# files per decoding task: large enough that Ray's cost per task is small (200,000 files on 2 cores: 25 s in
# chunks of 256, 20 s in chunks of 1024), and at least 16 chunks so that small data still spreads over the cores
CHUNK, MIN_CHUNKS = 1024, 16
# a decode cache that cannot take an entry: full, over quota, read-only, not ours. The search goes on without it
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass
class Decoding:
    """How files become arrays, and where they are kept.

    `store`: "memory" or "disk", or a function of the decoded size in bytes that picks one (the
    search's automatic choice). `cache`: folder of decoded data sets (needed by the disk store;
    None decodes in memory and keeps nothing). `run_chunks(fn, chunks, kwargs)`: yields
    `(k, fn(chunks[k], **kwargs))` as chunks finish, in any order (default: local threads).
    """

    image_size: int
    channels: int
    ct_window: str = "lung"
    store: str | Callable[[int], str] = "memory"
    cache: Path | None = None
    run_chunks: Callable | None = None
    progress_every: float = 30.0
    chosen: dict = field(default_factory=dict)  # filled in: the store used, cache folder, whether it was reused

    def options(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "ct_window": self.ct_window}


@dataclass
class Decoded:
    """The decoded files: `images` of the readable ones (in file order), `keep` per file, their
    `infos` (sha256, format, mode, size, patient_id), the `errors` of the unreadable ones, the DICOM
    objects without an image by kind (`no_image`), and the content `fingerprint`."""

    images: np.ndarray | DiskImages
    keep: np.ndarray
    infos: list[dict]
    errors: list[str]
    no_image: Counter
    fingerprint: str
    unreadable: np.ndarray | None = None  # per file, whether it is one of `errors` (decoded here, not from a cache)
    environment: list[bool] = field(default_factory=list)  # per error, whether it came from outside the file


def decode_files(files: list[Path], root: Path | None, decoding: Decoding) -> Decoded:
    """Decode `files` (paths under `root`) as `decoding` says, from its cache when the same files
    were decoded the same way before. The fingerprint hashes each file's path under `root` and bytes."""
    nbytes = len(files) * decoding.image_size ** 2 * decoding.channels
    store = decoding.store(nbytes) if callable(decoding.store) else decoding.store
    if store not in STORES:
        raise UserError(f"unknown data store {store!r}; choose one of {', '.join(STORES)}")
    if store == "disk" and decoding.cache is None:
        raise UserError("the disk data store needs a cache folder", option="data_cache")
    decoding.chosen.update(store=store, bytes=nbytes)
    if decoding.cache is None:
        return _decode(files, root, decoding, out=None)
    cache, key = Path(decoding.cache).expanduser(), _listing_key(files, root, decoding)
    folder = cache / key
    try:
        with key_lock(cache, key):
            record, wrong = whole_entry(folder)
            if wrong:
                print(f"warning: the decoded images cached in {folder} cannot be used ({wrong}); decoding again",
                      flush=True)
            decoding.chosen["reused"] = record is not None
            if record is None:
                folder = _decode_into_cache(files, root, decoding, folder)
            else:
                print(f"decoded images: reused {folder} ({len(files):,} files)", flush=True)
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        if whole_entry(folder)[0] is None:  # entries never change once in place: one is read safely without the lock
            _unwritable(cache, exc, "decoding into memory")
            decoding.chosen.update(store="memory", reused=False)
            return _decode(files, root, decoding, out=None)
        _unwritable(cache, exc, f"reading the entry it already holds, {folder.name}")
        decoding.chosen["reused"] = True
    decoding.chosen["cache"] = str(folder)
    decoded = _from_cache(folder, store)
    if store == "memory" and folder.name.startswith("."):  # a decode not kept: nothing reads it later
        shutil.rmtree(folder, ignore_errors=True)
    return decoded


def cache_arrays(images: np.ndarray, fingerprint: str, decoding: Decoding) -> DiskImages:
    """In-memory images (a `.npz` source) written once into the cache, keyed by their fingerprint
    and the decoding options, for the disk store."""
    key = "arrays-" + hashlib.sha256(json.dumps([fingerprint, decoding.options(), DECODER_VERSION]).encode()).hexdigest()[:24]
    cache = Path(decoding.cache).expanduser()
    try:
        with key_lock(cache, key):
            record, _ = whole_entry(cache / key)
            decoding.chosen.update(cache=str(cache / key), reused=record is not None)
            if record is None:
                tmp = fresh_folder(cache / key)
                try:
                    np.save(tmp / "images.npy", images)
                    place(tmp, cache / key, {"fingerprint": fingerprint, "options": decoding.options()})
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        if whole_entry(cache / key)[0] is None:
            _unwritable(cache, exc, "keeping the images in memory")
            decoding.chosen.update(store="memory", reused=False, cache=None)
            return images
        _unwritable(cache, exc, f"reading the entry it already holds, {key}")
        decoding.chosen.update(cache=str(cache / key), reused=True)
    return DiskImages(cache / key / "images.npy")


def _unwritable(cache: Path, exc: OSError, instead: str) -> None:
    kept = "" if instead.startswith("reading") else ("; these decoded images are not kept for later searches (free "
                                                     "space there, or give the decode cache a writable folder)")
    print(f"warning: the decode cache {cache} cannot be written ({exc.strerror or exc}): {instead}{kept}", flush=True)


# ---- decoding ----------------------------------------------------------------------------------

def _decode(files: list[Path], root: Path, decoding: Decoding, *, out: Path | None) -> Decoded:
    """Decode every file; the pixels go to memory, or with `out` into the `.npy` file `out` (one row
    per file, written as chunks finish, so the driver never holds them all)."""
    shape = (decoding.image_size, decoding.image_size, decoding.channels)
    row = int(np.prod(shape))
    size = chunk_size(len(files))
    chunks = [[str(p) for p in files[k:k + size]] for k in range(0, len(files), size)]
    results: list = [None] * len(chunks)
    memory = np.empty((len(files), *shape), np.uint8) if out is None else None
    fn, kwargs = decode_chunk, decoding.options()
    if out is not None:
        handle, offset = npy_for_rows(out, (len(files), *shape))
        token = uuid.uuid4().hex
        Path(f"{out}.token").write_text(token)
        fn, kwargs = decode_chunk_into, {**kwargs, "out": str(out), "offset": offset, "token": token}
        chunks = [(k * size, chunk) for k, chunk in enumerate(chunks)]
    run = decoding.run_chunks or _threads
    started = last = time.time()
    done, written = 0, {}  # chunk -> the checksum of the rows its task wrote into `out` itself
    try:
        for k, chunk in run(fn, chunks, kwargs):
            if time.time() - last >= decoding.progress_every and done < len(files):
                last = time.time()
                rate = done / (last - started)
                eta = f"ETA ~{clock((len(files) - done) / rate)}" if rate else "waiting for CPUs to decode on"
                print(f"decoding: {done:,}/{len(files):,} images ({rate:,.0f}/s), {eta}", flush=True)
            if chunk is None:  # nothing finished for a while
                continue
            first = k * size
            if memory is not None:
                ok = [i for i, r in enumerate(chunk["results"]) if "sha256" in r]
                rows_of = slice(first, first + len(ok)) if len(ok) == len(chunk["results"]) else [first + i for i in ok]
                memory[rows_of] = chunk["pixels"]
            elif chunk["pixels"] is not None:  # a task on a node that does not see the file, or cannot write it
                write_rows(handle.fileno(), offset + first * row, chunk["pixels"], chunk["results"])
            else:
                written[k] = chunk["crc"]
            results[k] = chunk["results"]
            done += len(chunk["results"])
        if out is not None:
            Path(f"{out}.token").unlink(missing_ok=True)  # no task writes from now on
            rewrite_lost_rows(out, handle, offset, row, chunks, results, written, decoding.options())
        flat = [r for chunk in results for r in chunk]
        retry_environment(files, flat, decoding.options(), memory=memory,
                           write=lambda i, pixels, r: write_rows(handle.fileno(), offset + i * row, pixels, [r]))
        if out is not None:
            os.fsync(handle.fileno())
    finally:
        if out is not None:
            handle.close()
            Path(f"{out}.token").unlink(missing_ok=True)
    keep = np.array(["sha256" in r for r in flat], bool)
    if len(files) >= 1000:
        print(f"decoded {len(files):,} images in {clock(time.time() - started)} "
              f"({len(files) / max(time.time() - started, 1e-9):,.0f}/s)", flush=True)
    if memory is not None and not keep.all():
        memory = memory[keep]
    return Decoded(images=memory if memory is not None else DiskImages(out), keep=keep,
                   infos=[r for r in flat if "sha256" in r], errors=[r["error"] for r in flat if "error" in r],
                   no_image=Counter(r["no_image"] for r in flat if "no_image" in r),
                   fingerprint=_content_fingerprint(files, root, flat),
                   unreadable=np.array(["error" in r for r in flat], bool),
                   environment=[bool(r.get("environment")) for r in flat if "error" in r])


def chunk_size(files: int) -> int:
    """Files per decoding task for `files` files."""
    return max(1, min(CHUNK, -(-files // MIN_CHUNKS)))


def _threads(fn, chunks: list, kwargs: dict) -> Iterator[tuple[int, dict]]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = {pool.submit(fn, chunk, **kwargs): k for k, chunk in enumerate(chunks)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _content_fingerprint(files: list[Path], root: Path, results: list[dict]) -> str:
    lines = sorted(f"{rel}\t{r.get('sha256', 'unreadable')}" for rel, r in zip(_relative(files, root), results))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


# ---- the cache ---------------------------------------------------------------------------------

def _listing_key(files: list[Path], root: Path, decoding: Decoding) -> str:
    """What identifies a decoding without reading the files: each file's path under `root`, size,
    modification and change time, the decoding options, and the versions of the decoding rules and
    of the packages that decode. An edited (or replaced, or restored) file changes a time, and its
    bytes change the fingerprint the cache records."""
    stats = map(os.stat, files)
    lines = "".join(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n"
                    for rel, st in zip(_relative(files, root), stats))
    versions = [decoding.options(), DECODER_VERSION, decoder_versions()]
    return hashlib.sha256((json.dumps(versions) + "\n" + lines).encode()).hexdigest()[:24]


def _decode_into_cache(files: list[Path], root: Path, decoding: Decoding, folder: Path) -> Path:
    """Decode into a fresh folder beside `folder` and rename it into place when complete: a crash
    never leaves a cache entry that looks whole, and a failure leaves no folder it created.
    Unreadable files' rows are dropped at the end. Returns the folder of the entry: `folder`, or the
    temporary one when a file failed for a reason outside it (the decode is then not kept)."""
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    tmp = fresh_folder(folder)
    try:
        decoded = _decode(files, root, decoding, out=tmp / "all.npy")
        if decoded.keep.all():
            os.replace(tmp / "all.npy", tmp / "images.npy")
        else:
            copy_rows(tmp / "all.npy", tmp / "images.npy", decoded.keep)
            (tmp / "all.npy").unlink()
        record = {"files": _relative(files, root), "keep": decoded.keep.tolist(), "infos": decoded.infos,
                  "errors": decoded.errors, "no_image": dict(decoded.no_image), "fingerprint": decoded.fingerprint,
                  "options": decoding.options(), "decoder_version": DECODER_VERSION, "decoders": decoder_versions()}
        outside = [e for e, r in zip(decoded.errors, decoded.environment) if r]
        if outside:
            (tmp / "files.json").write_text(json.dumps(record))
            print(f"warning: {len(outside)} file(s) failed twice for a reason outside them ({listing(outside)}); "
                  f"these decoded images are not kept for later searches", flush=True)
            return tmp
        place(tmp, folder, record)
        return folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # innermost first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def _from_cache(folder: Path, store: str) -> Decoded:
    record = json.loads((folder / "files.json").read_text())
    images = DiskImages(folder / "images.npy")
    return Decoded(images=images if store == "disk" else read_npy(folder / "images.npy"),
                   keep=np.array(record["keep"], bool), infos=record["infos"], errors=record["errors"],
                   no_image=Counter(record["no_image"]), fingerprint=record["fingerprint"])


def _relative(paths: list, root: Path | None) -> list[str]:
    return relative_paths(paths, root) if root is not None else [str(p) for p in paths]


def decode_images(files: list[Path], *, image_size: int, channels: int, ct_window: str = "lung",
                  skip_corrupt: bool = False) -> tuple[np.ndarray, list[Path], dict[Path, str]]:
    """Decode files in memory exactly as a search does (`search.predict`): the images, the files
    they are (a DICOM object without an image is left out, with a warning that counts them), and
    with `skip_corrupt` each unreadable file and why (a warning names them).

    Raises:
        UserError: naming every file that is not a readable image (unless `skip_corrupt`).
    """
    files = list(files)
    decoded = decode_files(files, None, Decoding(image_size=image_size, channels=channels, ct_window=ct_window))
    if decoded.errors and not skip_corrupt:
        raise UserError(f"{len(decoded.errors)} image(s) could not be read: {listing(decoded.errors)}; fix or "
                        f"remove them, or skip them to predict the others", option="skip_corrupt")
    if decoded.errors:
        warnings.warn(f"{len(decoded.errors)} unreadable image(s) have no prediction (their rows say why): "
                      f"{listing(decoded.errors)}", stacklevel=2)
    if decoded.no_image:
        warnings.warn("left out " + ", ".join(f"{n} DICOM object(s) without pixel data ({kind})"
                                              for kind, n in decoded.no_image.items()), stacklevel=2)
    failed = [f for f, bad in zip(files, decoded.unreadable) if bad]
    return decoded.images, [f for f, k in zip(files, decoded.keep) if k], dict(zip(failed, decoded.errors))


def raise_unreadable(decoded: Decoded, *, skip_corrupt: bool) -> None:
    """The unreadable files, all named in one error, or (`skip_corrupt`) in one warning.

    Raises:
        UserError: some file is unreadable and `skip_corrupt` is off, or no file is readable.
    """
    if decoded.errors and not skip_corrupt:
        raise UserError(f"{len(decoded.errors)} image(s) could not be read: {listing(decoded.errors)}; fix or remove "
                        f"them, or skip them to leave them out", option="skip_corrupt")
    if decoded.errors:
        warnings.warn(f"left out {len(decoded.errors)} unreadable image(s): {'; '.join(decoded.errors)}", stacklevel=2)
    if not decoded.keep.any():
        raise UserError("none of the images could be read")
