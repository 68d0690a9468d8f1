"""Finalize a search: retrain its best configurations, assemble the top-k ensemble, and report
on the test split that the search never saw.

    python -m search.finalize --experiment experiments/backbones-20261123-0100
    python -m search.finalize --experiment experiments/recipes-x --top-k 5 --seeds 3 --positive-class COVID

`python -m search.run` runs this at its end unless given `--no-finalize`; it also works on an
interrupted search (it uses the trials that reported). Writes `<experiment>/final/`:
`metrics.json`, `test_predictions.csv`, `val_predictions.csv`, `report.md`, the plots
`roc.png`, `confusion_matrix.png`, `training_curves.png`, `search_progress.png`, and the model
directories `ensemble/` (the chosen final model, what `python -m search.predict` loads) and
`members/<name>/`.
"""
from __future__ import annotations

import argparse
import sys

from search.cli import add_flags, from_flags, handle_errors
from search.final.pipeline import finalize
from search.options import FinalizeOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.finalize", description=__doc__.split("\n\n")[0])
    add_flags(p, FinalizeOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    options = from_flags(build_parser().parse_args(argv), FinalizeOptions)
    return handle_errors(lambda: finalize(options))


if __name__ == "__main__":
    sys.exit(main())
