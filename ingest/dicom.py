"""DICOM files to 8-bit pixels, by the rules a radiologist's viewer applies, through pydicom's own
functions (`apply_modality_lut`, `apply_voi_lut`, `apply_windowing`, `apply_color_lut`):

- the modality LUT first (Rescale Slope / Intercept), so CT pixels are Hounsfield units;
- then the VOI stage, its output range mapped onto 0..255. CT: a lung window (`ct_window`: "lung" =
  centre -600 HU, width 1500, "mediastinum" = 40 / 400, "file" = the file's own VOI, or "C,W" in
  HU); other modalities (X-rays): the file's VOI LUT, else its window (the first one when it gives
  several; its VOI LUT Function, LINEAR, LINEAR_EXACT or SIGMOID, honoured), else the image's own
  range;
- MONOCHROME1 (white = 0) inverted, so every image shows bone bright;
- pixels the scanner marks as padding (Pixel Padding Value, and Range Limit) black, and left out of
  the image's own range;
- PALETTE COLOR through its colour table;
- a file holding several frames is refused (one image per file), and so is an image file cut off
  before its pixel data; `info["kind"]` names localizers (scouts) and secondary captures.

Example:
    >>> pixels, info = read_dicom(Path("slice.dcm").read_bytes(), ct_window="lung")
    >>> pixels.dtype, info["modality"], info["patient_id"]
    (dtype('uint8'), 'CT', 'LIDC-0001')
"""
from __future__ import annotations

import io

import numpy as np

from core.choices import check_ct_window
from core.errors import UserError
from ingest.pixels import to_uint8

DICOM_EXTENSIONS = (".dcm", ".dicom")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants (.7.1 to .7.4)
FAR = np.array([-1e12, 1e12])  # inputs beyond any window: its output's ends


# what a header says of the acquisition and the patient (the audit's shortcut probe and the report's strata)
ACQUISITION = {"manufacturer": "Manufacturer", "model": "ManufacturerModelName", "station": "StationName",
               "view": "ViewPosition", "sex": "PatientSex", "age": "PatientAge"}


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
        raise UserError(f"cut short or damaged: not a readable DICOM file ({type(exc).__name__}: "
                        f"{str(exc)[:80]})") from None
    info = {"modality": str(ds.get("Modality", "") or ""), "patient_id": str(ds.get("PatientID", "") or "").strip(),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""), "bits": int(ds.get("BitsStored", 8) or 8),
            **({"kind": kind} if (kind := _kind(ds)) else {}),
            **{key: value for key, keyword in ACQUISITION.items() if (value := str(ds.get(keyword, "") or "").strip())}}
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if ("Rows" in ds and "Columns" in ds) or _image_class(sop):  # an image, but no pixels: the file is cut
            raise UserError(f"cut short or damaged: the file ends before its pixel data, though "
                            f"{'its SOP class (' + _image_class(sop) + ') is an image' if _image_class(sop) else 'it has an image size'}"
                            f" (cut short in a copy or a download?)")
        raise NoImage(info["modality"] or str(sop or "unknown"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(f"it holds {frames} frames (a multi-frame DICOM); export one image per file")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # a missing decoder, or damaged pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        named = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        why = f"its pixel data cannot be decoded{named}: {str(exc).strip().splitlines()[0][:200]}"
        if syntax is not None and not _decoder_installed(syntax):
            raise MissingDecoder(why) from None
        raise UserError(f"cut short or damaged: {why}") from None
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # colour (RGB, or YBR that pydicom converted)
        return np.ascontiguousarray(raw[..., :3]).astype(np.uint8) if raw.dtype == np.uint8 else _stretch(raw[..., :3]), info
    if info["photometric"] == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = np.asarray(apply_color_lut(raw, ds), np.float64) * (255 / (2 ** bits - 1))
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8), info
    return _to_display(raw, ds, info, ct_window), info


def _image_class(sop) -> str:
    """The name of an image SOP class ("CT Image Storage"), or "" for any other class (a report, a
    presentation state) or none."""
    from pydicom.uid import UID
    try:
        name = UID(str(sop)).name if sop else ""
    except Exception:  # a malformed UID string
        return ""
    return name if "Image Storage" in name else ""


def _kind(ds) -> str | None:
    """"localizer" (a scout, ImageType LOCALIZER) or "secondary capture" (a screenshot-like SOP class)."""
    image_type = ds.get("ImageType") or []
    if any(str(v).upper() == "LOCALIZER" for v in (image_type if not isinstance(image_type, str) else [image_type])):
        return "localizer"
    if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE):
        return "secondary capture"
    return None


class MissingDecoder(UserError):
    """Pixel data in a transfer syntax no installed package decodes: the machine's fault, not the file's."""


def _decoder_installed(syntax) -> bool:
    from pydicom.pixels import get_decoder
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # a syntax pydicom has no decoder for at all
        return False


class NoImage(UserError):
    """A DICOM object that holds no image (a structured report, a presentation state, a DICOMDIR)."""

    def __init__(self, kind: str):
        super().__init__(f"DICOM object without pixel data ({kind})")
        self.kind = kind


def _to_display(raw: np.ndarray, ds, info: dict, ct_window: str) -> np.ndarray:
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    padding = _padding(raw, ds)
    x = np.asarray(apply_modality_lut(raw, ds))
    if not np.isfinite(x).all():
        raise UserError("the image has NaN or infinite pixels; fix the file (no 8-bit image can show them)")
    window = check_ct_window(ct_window) if info["modality"] == "CT" else None
    if window is not None:  # the chosen window, by the DICOM linear rule
        voi = Dataset()
        voi.PhotometricInterpretation, voi.BitsStored, voi.PixelRepresentation = "MONOCHROME2", 16, 1
        voi.WindowCenter, voi.WindowWidth = window
        out = _onto_8bit(lambda a: apply_windowing(a, voi), x.astype(np.float64), FAR)
    elif ds.get("VOILUTSequence"):  # a LUT is indexed by whole numbers, from its first mapped value
        entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        ends = np.array([first, first + (entries or 2 ** 16) - 1])
        out = _onto_8bit(lambda a: apply_voi_lut(a, ds, prefer_lut=True), np.round(x).astype(np.int64), ends)
    elif _file_window(ds) is not None:
        out = _onto_8bit(lambda a: apply_voi_lut(a, ds, prefer_lut=False), x.astype(np.float64), FAR)
    else:  # no window: the rule every other source follows, over the pixels that are not padding
        x = x.astype(np.float64)
        if padding is not None and not padding.all():
            x = np.where(padding, x[~padding].min(), x)
        out = to_uint8(x)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if info["photometric"] == "MONOCHROME1":
        out = 255 - out
    if padding is not None:
        out[padding] = 0
    return out


def _onto_8bit(voi, x: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """`voi(x)` mapped from its output range (what it gives at the `ends` of its input range: a
    window's y-range, a VOI LUT's first and last entries) onto 0..255."""
    with np.errstate(over="ignore"):  # the sigmoid of a far-off input overflows to its limit
        low, high = sorted(float(v) for v in np.asarray(voi(ends.astype(x.dtype)), np.float64))  # a LUT may descend
    y = np.asarray(voi(x), np.float64)
    return (y - low) * (255 / (high - low)) if high != low else np.zeros_like(y)


def _padding(raw: np.ndarray, ds) -> np.ndarray | None:
    """Where the stored pixels are padding (Pixel Padding Value, up to its Range Limit), if the file says."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    low, high = min(int(value), int(limit)), max(int(value), int(limit))
    return (raw >= low) & (raw <= high)


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


def _stretch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    low, high = float(x.min()), float(x.max())
    return np.clip(np.round((x - low) * (255 / max(high - low, 1e-12))), 0, 255).astype(np.uint8)
