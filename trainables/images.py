"""Image files to uint8 arrays: every supported file decodes to one mode and one size, the same
way in training (`trainables.data`) and in `search.predict`.

Example:
    >>> decode_image("scan.png", image_size=64, channels=1).shape
    (64, 64, 1)
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from trainables import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_LISTED = 10
# "auto" image size (the CPU profile): MedMNIST-sized images stay near their 28 px, larger files
# (CT slices, full X-rays) go to 64 px, where the CT models gain 0.01-0.03 test AUC (BENCHMARKS.md)
AUTO_SIZES = {"small": 32, "large": 64}
AUTO_SMALL_UP_TO = 48


def check_image_size(value) -> None:
    """Raises UserError unless `value` is "auto" or a whole number of pixels, 8 or more."""
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if value != "auto" and not (whole and value >= 8):
        raise UserError(f"--image-size must be 'auto' or a whole number of pixels, 8 or more; got {value!r}")


def decode_image(path: str | os.PathLike, *, image_size: int, channels: int) -> np.ndarray:
    """Read one image file as uint8 (image_size, image_size, channels), whatever its mode: pixels
    that are not 8-bit go through `to_uint8`, alpha is dropped, and every image ends in the same
    mode, so the file's mode can never carry the label.

    Raises:
        UserError: a stack of frames, or pixels that cannot be shown as 8-bit (see `to_uint8`).
    """
    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            raise UserError(f"it holds {im.n_frames} frames (a stack); save one image per file")
        im.load()
        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            im = Image.fromarray(to_uint8(np.asarray(im)))
        im = im.convert("RGB" if channels == 3 else "L")
        im = im.resize((image_size, image_size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """One image's pixels as uint8, by one rule for every source (files and .npz arrays alike):
    8-bit stays as it is; values already within 0..255 are kept; floats within 0..1 are scaled by
    255; other non-negative values (16-bit X-rays) are scaled by the image's own maximum; values
    with negatives (CT in Hounsfield units) are stretched from the image's minimum to its maximum.

    Raises:
        UserError: NaN or infinite pixels, which no 8-bit image shows faithfully.
    """
    if pixels.dtype == np.uint8:
        return pixels
    x = pixels.astype(np.float64)
    if not np.isfinite(x).all():
        raise UserError("the image has NaN or infinite pixels; fix the file (no 8-bit image can show them)")
    low, high = float(x.min()), float(x.max())
    if low >= 0 and high <= 1 and pixels.dtype.kind in "fb":
        x = x * 255
    elif low < 0:
        x = (x - low) * (255 / max(high - low, 1e-12))
    elif high > 255:
        x = x * (255 / high)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def decode_images(files: list[Path], *, image_size: int, channels: int) -> np.ndarray:
    """Decode image files into uint8 (N, image_size, image_size, channels), as `load_dataset` does.

    Raises:
        UserError: naming every file that is not a readable image.
    """
    return decode_all(files, image_size=image_size, channels=channels, skip_corrupt=False,
                       fix="fix or remove them")[0]


def auto_image_size(native_side: int) -> int:
    """The side an "auto" image size decodes to, given the images' own shorter side."""
    return AUTO_SIZES["small"] if native_side <= AUTO_SMALL_UP_TO else AUTO_SIZES["large"]


def native_side(files: list[Path], sample: int = 64) -> int:
    """Median shorter side of up to `sample` files spread over the list (headers only);
    unreadable files are skipped here and reported by the decoding."""
    sides = []
    for p in files[:: max(1, len(files) // sample)][:sample]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except Exception:  # PIL raises many kinds; _decode_all names the file
            continue
    return int(np.median(sides)) if sides else AUTO_SMALL_UP_TO + 1


def decode_all(files: list[Path], *, image_size: int | str, channels: int, skip_corrupt: bool,
                fix: str = "fix or remove them, or pass --skip-corrupt to leave them out"):
    if image_size == "auto":
        image_size = auto_image_size(native_side(files))

    def one(p):
        try:
            return decode_image(p, image_size=image_size, channels=channels), None
        except UserError as exc:  # read, but not decodable faithfully: the reason in full
            return None, f"{p} ({exc})"
        except Exception as exc:  # PIL raises many kinds for a bad file
            return None, f"{p} ({type(exc).__name__}: {str(exc)[:80]})"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, files))
    bad = [err for _, err in results if err]
    if bad and not skip_corrupt:
        raise UserError(f"{len(bad)} image(s) could not be read: {listing(bad)}; {fix}")
    if bad:
        warnings.warn(f"left out {len(bad)} unreadable image(s): {'; '.join(bad)}", stacklevel=2)
    keep = np.array([err is None for _, err in results])
    good = [img for img, err in results if err is None]
    if not good:
        raise UserError("none of the images could be read")
    return np.stack(good), keep


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


def images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
