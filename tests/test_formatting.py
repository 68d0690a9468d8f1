"""The one way figures, sizes and durations are written (`core.formatting`)."""
from core.formatting import clock, duration, figure, interval, size


def test_figures_sizes_and_durations_read_the_same_everywhere():
    assert figure(0.98765) == "0.988" and figure(0.5, 4) == "0.5000" and figure(None) == "n/a"
    assert interval((0.9, 0.99)) == "0.900-0.990" and interval(None) == "n/a" and interval(()) == "n/a"
    assert [size(n) for n in (512, 48_200_000, 1_500_000_000, 7e12)] == ["512 B", "48.2 MB", "1.5 GB", "7,000.0 GB"]
    assert [clock(s) for s in (59.9, 61, 3725)] == ["0:59", "1:01", "1:02:05"]
    assert [duration(s) for s in (30, 119, 120, 600)] == ["30 s", "119 s", "2 min", "10 min"]
