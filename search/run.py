"""Run a hyperparameter search: Ray Tune + Optuna + ASHA over a named space.

    python -m search.run --space backbones --data ../shared/data/pneumoniamnist/pneumoniamnist.npz
    python -m search.run --space recipes --data path/to/images --weights random
    python -m search.run --space backbones --data /mnt/shared/data/images --address auto --profile gpu \\
        --storage /mnt/shared/experiments

Writes `<storage>/<name>/`: Ray Tune's results, `leaderboard.csv` and
`leaderboard_by_backbone.csv` (rewritten as trials end), `optuna_trials.csv`,
`search_progress.png` and `search_config.json` (options, versions, data fingerprint); then, unless
`--no-finalize`, `final/` (see search/final_model.py): the retrained top-k, the ensemble, the report.
"""
from __future__ import annotations

import argparse
import sys

from search.cli import add_flags, from_flags, handle_errors
from search.experiment import run_search
from search.options import PROFILES, SearchOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.split("\n\n")[0])
    add_flags(p, SearchOptions, profiles=PROFILES)
    return p


def main(argv: list[str] | None = None) -> int:
    options = from_flags(build_parser().parse_args(argv), SearchOptions)
    return handle_errors(lambda: run_search(options), interrupted="interrupted: continue with --resume --name <name>")


if __name__ == "__main__":
    sys.exit(main())
