"""DICOM files to 8-bit pixels, by the rules a radiologist's viewer applies.

- the modality LUT first (Rescale Slope / Intercept), so CT pixels are Hounsfield units;
- CT: a lung window (`ct_window`: "lung" = centre -600 HU, width 1500, "mediastinum" = 40 / 400,
  "file" = the file's own window, or "C,W" in HU);
- other modalities (X-rays): the file's VOI LUT, else its window (the first one when it gives
  several), else the image's own range;
- MONOCHROME1 (white = 0) inverted, so every image shows bone bright;
- a file holding several frames is refused: one image per file.

Example:
    >>> pixels, info = read_dicom(Path("slice.dcm").read_bytes(), ct_window="lung")
    >>> pixels.dtype, info["modality"], info["patient_id"]
    (dtype('uint8'), 'CT', 'LIDC-0001')
"""
from __future__ import annotations

import io

import numpy as np

from trainables import UserError
from trainables.pixels import to_uint8

CT_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}
DICOM_EXTENSIONS = (".dcm", ".dicom")


def check_ct_window(value: str) -> tuple[float, float] | None:
    """(centre, width) in HU for a `--ct-window` value, None for "file".

    Raises:
        UserError: naming the value and the allowed ones.
    """
    if value in CT_WINDOWS:
        return CT_WINDOWS[value]
    if value == "file":
        return None
    try:
        centre, width = (float(v) for v in str(value).split(","))
    except ValueError:
        centre, width = 0.0, 0.0
    if width <= 0:
        raise UserError(f"--ct-window must be one of {', '.join(CT_WINDOWS)}, file, or 'centre,width' in HU with a "
                        f"positive width (e.g. -600,1500); got {value!r}")
    return centre, width


def is_dicom(head: bytes) -> bool:
    """Whether a file's first 132 bytes carry the DICOM preamble ("DICM" at byte 128)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_dicom(data: bytes, *, ct_window: str = "lung") -> tuple[np.ndarray, dict]:
    """One DICOM file's bytes as uint8 pixels (H, W) or (H, W, 3), and what the file says of itself
    (`modality`, `patient_id`, `photometric`, `bits`).

    Raises:
        UserError: not DICOM, no pixel data, several frames, or a compressed transfer syntax whose
            decoder is not installed (pydicom's message names the package).
    """
    import pydicom  # only DICOM data needs it

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise UserError(f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:80]})") from None
    info = {"modality": str(ds.get("Modality", "") or ""), "patient_id": str(ds.get("PatientID", "") or "").strip(),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""), "bits": int(ds.get("BitsStored", 8) or 8)}
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NoImage(info["modality"] or str(ds.get("SOPClassUID", "unknown")))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(f"it holds {frames} frames (a multi-frame DICOM); export one image per file")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # a missing decoder, or damaged pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        named = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise UserError(f"its pixel data cannot be decoded{named}: {str(exc).strip().splitlines()[0][:200]}") from None
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # colour (RGB, or YBR that pydicom converted)
        return np.ascontiguousarray(raw[..., :3]).astype(np.uint8) if raw.dtype == np.uint8 else _stretch(raw[..., :3]), info
    return _to_display(raw, ds, info, ct_window), info


class NoImage(UserError):
    """A DICOM object that holds no image (a structured report, a presentation state, a DICOMDIR)."""

    def __init__(self, kind: str):
        super().__init__(f"DICOM object without pixel data ({kind})")
        self.kind = kind


def _to_display(raw: np.ndarray, ds, info: dict, ct_window: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    x = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    if not np.isfinite(x).all():
        raise UserError("the image has NaN or infinite pixels; fix the file (no 8-bit image can show them)")
    window = check_ct_window(ct_window) if info["modality"] == "CT" else None
    if window is None:
        window = _file_window(ds)
    if window is not None:
        out = _window(x, *window)
    elif "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2]) or 16
        out = np.asarray(apply_voi_lut(x, ds, prefer_lut=True), np.float64) * (255 / (2 ** bits - 1))
    else:
        out = to_uint8(x)  # no window: the rule every other source follows
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return 255 - out if info["photometric"] == "MONOCHROME1" else out


def _file_window(ds) -> tuple[float, float] | None:
    """The file's first (centre, width), if it gives one."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    first = lambda v: float(v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v)  # noqa: E731
    try:
        c, w = first(centre), first(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w > 0 else None


def _window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """The DICOM linear window (PS3.3 C.11.2.1.2) onto 0..255."""
    if width <= 1:
        return np.where(x <= centre - 0.5, 0.0, 255.0)
    y = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(y, 0, 255)


def _stretch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    low, high = float(x.min()), float(x.max())
    return np.clip(np.round((x - low) * (255 / max(high - low, 1e-12))), 0, 255).astype(np.uint8)
