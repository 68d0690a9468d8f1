"""How figures, intervals, sizes and durations are written, in reports, tables and console lines.

    >>> figure(0.98765), interval((0.9, 0.99)), size(48_200_000), clock(3725), duration(300)
    ('0.988', '0.900-0.990', '48.2 MB', '1:02:05', '5 min')
"""


def figure(x: float | None, digits: int = 3) -> str:
    """A figure that may be missing (None: its denominator was 0)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def interval(bounds) -> str:
    """A confidence interval as low-high, or n/a where there is none."""
    return f"{bounds[0]:.3f}-{bounds[1]:.3f}" if bounds else "n/a"


def size(nbytes: float) -> str:
    """Bytes in decimal units: 512 B, 48.2 MB, 1.5 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    return ""


def clock(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def duration(seconds: float) -> str:
    """A wait in words: seconds below two minutes, whole minutes above."""
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
