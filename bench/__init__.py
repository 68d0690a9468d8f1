"""The benchmarks: run each from the repository root as `python -m bench.<name>` (`--help` says
what it measures); `bench.common` records their rows."""
