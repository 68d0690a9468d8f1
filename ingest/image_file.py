"""One image file to a uint8 array: every supported file decodes to one mode and one size, the same
way in training (`ingest.dataset`) and in `search.predict`; a chunk of files decoded in a thread or
a Ray task; stacks of arrays brought to a size and a number of channels.

Example:
    >>> decode_image("scan.png", image_size=64, channels=1).shape
    (64, 64, 1)
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import UserError
from ingest.dicom import ACQUISITION, DICOM_EXTENSIONS, MissingDecoder, NoImage, is_dicom, read_dicom
from ingest.files import IMAGE_EXTENSIONS
from ingest.pixels import to_uint8

# "auto" image size (the CPU profile): MedMNIST-sized images stay near their 28 px, larger files
# (CT slices, full X-rays) go to 64 px, where the CT models gain 0.01-0.03 test AUC (BENCHMARKS.md)
AUTO_SIZES = {"small": 32, "large": 64}
AUTO_SMALL_UP_TO = 48


def decode_image(path: str | os.PathLike, *, image_size: int, channels: int, ct_window: str = "lung") -> np.ndarray:
    """Read one image file (PNG, JPEG, BMP, TIFF or DICOM) as uint8 (image_size, image_size, channels),
    whatever its mode: pixels that are not 8-bit go through `to_uint8` (DICOM through
    `ingest.dicom`), alpha is dropped, and every image ends in the same mode, so the file's mode
    can never carry the label.

    Raises:
        UserError: a stack of frames, or pixels that cannot be shown as 8-bit (see `to_uint8`).
    """
    return decode_bytes(Path(path).read_bytes(), image_size=image_size, channels=channels, ct_window=ct_window,
                        dicom=Path(path).suffix.lower() in DICOM_EXTENSIONS)[0]


def decode_bytes(data: bytes, *, image_size: int, channels: int, ct_window: str = "lung",
                 dicom: bool = False) -> tuple[np.ndarray, dict]:
    """One file's bytes as `decode_image` decodes them, and what the audit and the fingerprint need
    of the file: `sha256` of its bytes, its `format`, `mode` and `size` (and a DICOM's `patient_id`).
    `dicom`: read as DICOM even without the preamble (a `.dcm` file)."""
    info = {"sha256": hashlib.sha256(data).hexdigest()[:32], "bytes": len(data)}
    if dicom or is_dicom(data[:132]):
        pixels, meta = read_dicom(data, ct_window=ct_window)
        info.update(format="DICOM", mode=f"{meta['photometric'] or '?'} {meta['bits']}-bit {meta['modality']}".strip(),
                    size=f"{pixels.shape[1]}x{pixels.shape[0]}",
                    **{k: meta[k] for k in ("patient_id", "kind", *ACQUISITION) if k in meta})
        im = Image.fromarray(pixels)
    else:
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise UserError(f"not an image file (expected {', '.join(IMAGE_EXTENSIONS)})") from None
        if getattr(im, "n_frames", 1) > 1:
            raise UserError(f"it holds {im.n_frames} frames (a stack); save one image per file")
        im.load()
        info.update(format=im.format or "?", mode=im.mode, size=f"{im.width}x{im.height}")
        if quantization := getattr(im, "quantization", None):  # a JPEG's compression setting (quality), not content
            info["jpeg_quantization"] = round(float(np.mean(quantization[min(quantization)])), 2)
        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            im = Image.fromarray(to_uint8(np.asarray(im)))
    im = im.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(im.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr), info


def auto_image_size(native_side: int) -> int:
    """The side an "auto" image size decodes to, given the images' own shorter side."""
    return AUTO_SIZES["small"] if native_side <= AUTO_SMALL_UP_TO else AUTO_SIZES["large"]


def native_side(files: list[Path], sample: int = 64) -> int:
    """Median shorter side of up to `sample` files spread over the list (headers only);
    unreadable files are skipped here and reported by the decoding."""
    sides = []
    for p in files[:: max(1, len(files) // sample)][:sample]:
        try:
            sides.append(_shorter_side(Path(p)))
        except Exception:  # PIL and pydicom raise many kinds; the decoding names the file
            continue
    return int(np.median(sides)) if sides else AUTO_SMALL_UP_TO + 1


def _shorter_side(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(132)
    if path.suffix.lower() in DICOM_EXTENSIONS or is_dicom(head):
        import pydicom
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return min(int(ds.Rows), int(ds.Columns))
    with Image.open(path) as im:
        return min(im.size)


def decode_chunk(files: list, *, image_size: int, channels: int, ct_window: str = "lung") -> dict:
    """Decode a chunk of files: `pixels`, the decoded images stacked (in order, unreadable ones left
    out), and per file a `results` entry: its `decode_bytes` info, or {"error": "<file> (<why>)"}
    (with "environment": True when the cause lies outside the file), or {"no_image": kind} for a
    DICOM object that holds no image. Runs anywhere (a thread, a Ray task)."""
    pixels, results = [], []
    for p, data in _read_ahead(files):
        try:
            if isinstance(data, OSError):
                raise data
            image, info = decode_bytes(data, image_size=image_size, channels=channels,
                                       ct_window=ct_window, dicom=Path(p).suffix.lower() in DICOM_EXTENSIONS)
        except NoImage as exc:
            results.append({"no_image": exc.kind})
            continue
        except MissingDecoder as exc:
            results.append({"error": f"{p} ({exc})", "environment": True})
            continue
        except UserError as exc:  # read, but not decodable faithfully: the reason in full
            results.append({"error": f"{p} ({exc})"})
            continue
        except Exception as exc:  # PIL and the OS raise many kinds for a bad file
            # reading it, memory or an import failed: the machine, not the file (the cache never keeps it)
            outside = data is exc or isinstance(exc, (MemoryError, ImportError))
            results.append({"error": f"{p} ({type(exc).__name__}: {str(exc)[:80]})", **({"environment": True} if outside else {})})
            continue
        pixels.append(image)
        results.append(info)
    empty = np.zeros((0, image_size, image_size, channels), np.uint8)
    return {"pixels": np.stack(pixels) if pixels else empty, "results": results}


def _read_ahead(files: list, batch: int = 32):
    """`(file, its bytes or the OSError reading it)` in order, the next `batch` files read by a
    thread while these decode, so that the decoding does not wait on the disk (or a network file
    system) file by file."""
    def read(paths):
        out = []
        for p in paths:
            try:
                out.append(Path(p).read_bytes())
            except OSError as exc:
                out.append(exc)
        return out

    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, files[:batch])
        for start in range(0, len(files), batch):
            contents = ahead.result()
            if start + batch < len(files):
                ahead = pool.submit(read, files[start + batch:start + 2 * batch])
            yield from zip(files[start:start + batch], contents)


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """A stack of images (N, H, W[, C]) as uint8 with `channels` channels, each image by `to_uint8`."""
    if x.dtype != np.uint8:
        converted = []
        for i, image in enumerate(x):
            try:
                converted.append(to_uint8(image))
            except UserError as exc:
                raise UserError(f"image #{i}: {exc}") from None
        x = np.stack(converted)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == channels:
        return x
    if channels == 3:
        return np.repeat(x[..., :1], 3, axis=-1)
    gray = x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(gray)[..., None].astype(np.uint8)


def resize_array(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[1] == size and x.shape[2] == size:
        return np.ascontiguousarray(x)
    out = np.empty((len(x), size, size, x.shape[-1]), np.uint8)
    for i, img in enumerate(x):
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = np.asarray(im.resize((size, size), Image.BILINEAR)).reshape(size, size, -1)
    return out

