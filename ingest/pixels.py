"""One rule for pixels that are not 8-bit, shared by image files, `.npz` arrays and DICOM.

Example:
    >>> to_uint8(np.array([[0, 2048, 4095]], np.uint16))
    array([[  0, 128, 255]], dtype=uint8)
"""
from __future__ import annotations

import numpy as np

from core.errors import UserError


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
