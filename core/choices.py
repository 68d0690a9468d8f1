"""The allowed values of the options and of a trial's config, written once, and the checks that
need nothing else: `search.options` builds its flags from them, `trainables.config` checks a trial's
config against them, the ingest and the samplers use them.

    >>> check_ct_window("lung"), check_ct_window("40,400"), check_ct_window("file")
    ((-600.0, 1500.0), (40.0, 400.0), None)
"""
from __future__ import annotations

from numbers import Integral

from core.errors import UserError

DATA_ENV = "SEARCH_DATA"  # the data a search runs on when --data is not given
METRIC_MODES = {"val_auc": "max", "val_acc": "max", "val_f1": "max", "val_loss": "min"}
SAMPLER_NAMES = ("tpe", "random", "qmc", "gp")  # search.engine.samplers builds each
WEIGHTS = ("imagenet", "random")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: the fastest measured on the device (trainables.execution)
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
CT_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}  # (centre, width) in HU


def check_image_size(value) -> None:
    """Raises UserError unless `value` is "auto" or a whole number of pixels, 8 or more."""
    whole = isinstance(value, Integral) and not isinstance(value, bool)
    if value != "auto" and not (whole and value >= 8):
        raise UserError(f"--image-size must be 'auto' or a whole number of pixels, 8 or more; got {value!r}")


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
