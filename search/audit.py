"""Audit a data set without searching: counts, duplicate files, shortcuts (see ingest/leakage.py).

    python -m search.audit --data ../shared/data/covid-ct-ucsd/patients.csv --out audit/

Prints the summary and, with `--out`, writes `data_report.md` and `data_report.json` there (a
search writes the same two files into its experiment folder before it trains anything).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search.cli import add_flags, from_flags, handle_errors
from search.data.search_data import PREVIEW, audited, data_path, load_search_data, write_audit
from search.options import SearchOptions

FLAGS = ("data", "image_size", "channels", "group_column", "strata", "seed", "skip_corrupt", "ct_window")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.audit", description=__doc__.split("\n\n")[0])
    add_flags(p, SearchOptions, only=FLAGS)
    p.add_argument("--out", help="folder to write data_report.md and data_report.json into")
    return p


def audit(o: SearchOptions, out: str | None) -> None:
    data = load_search_data(data_path(o.data), image_size=o.image_size or "auto", channels=o.channels, seed=o.seed,
                            group_column=o.group_column, skip_corrupt=o.skip_corrupt, ct_window=o.ct_window,
                            strata_columns=tuple(o.strata or ()))
    _, report = audited(data, dedupe=False)
    if out:
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        write_audit(folder, report, data)
        print(f"written: {folder / 'data_report.md'}, {folder / 'data_report.json'}, {folder / PREVIEW}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return handle_errors(lambda: audit(from_flags(args, SearchOptions), args.out))


if __name__ == "__main__":
    sys.exit(main())
