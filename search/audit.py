"""Audit a data set without searching: counts, duplicate files, shortcuts (see trainables/audit.py).

    python -m search.audit --data ../shared/data/covid-ct-ucsd/patients.csv --out audit/

Prints the summary and, with `--out`, writes `data_report.md` and `data_report.json` there (a
search writes the same two files into its experiment folder before it trains anything).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainables import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder, MedMNIST-style .npz or CSV manifest")
    p.add_argument("--out", help="folder to write data_report.md and data_report.json into")
    p.add_argument("--image-size", type=int, default=32, help="decoded size (duplicates of arrays are of pixels)")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3])
    p.add_argument("--group-column", help="manifest column of patient ids (detected by name when obvious)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, where the data gives none")
    p.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out, with a warning")
    args = p.parse_args(argv)
    try:
        from search.leaderboard import write_atomic
        from trainables.audit import audit_dataset, render, summary_lines
        from trainables.data import load_dataset
        data = load_dataset(args.data, image_size=args.image_size, channels=args.channels, seed=args.seed,
                            group_column=args.group_column, skip_corrupt=args.skip_corrupt)
        report = audit_dataset(data)
        print("\n".join(summary_lines(report)))
        if args.out:
            out = Path(args.out).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "data_report.json", lambda f: f.write_text(json.dumps(report, indent=2)))
            write_atomic(out / "data_report.md", lambda f: f.write_text(render(report)))
            print(f"written: {out / 'data_report.md'}, {out / 'data_report.json'}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
