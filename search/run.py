"""Run a hyperparameter search: Ray Tune + Optuna + ASHA over a named space.

    python -m search.run --space backbones --data ../shared/data/pneumoniamnist/pneumoniamnist.npz
    python -m search.run --space recipes --data path/to/images --weights random
    python -m search.run --space backbones --data /mnt/shared/data/images --address auto --profile gpu \\
        --storage /mnt/shared/experiments

Writes `<storage>/<name>/`: Ray Tune's results, `leaderboard.csv` and
`leaderboard_by_backbone.csv` (rewritten as trials end), `optuna_trials.csv`,
`search_progress.png` and `search_config.json` (options, versions, data fingerprint); then, unless
`--no-finalize`, `final/` (see search/final/pipeline.py): the retrained top-k, the ensemble, the report.

In Python:

    >>> folder = run_search(SearchOptions(space="tiny", data="pneumoniamnist.npz", num_samples=4))
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from search.cli import add_flags, from_flags, handle_errors
from search.engine.experiment import run_experiment
from search.final.pipeline import finalize
from search.options import PROFILES, FinalizeOptions, SearchOptions, SharedOptions


def run_search(options: SearchOptions) -> Path:
    """Search (or resume a search), then finalize it unless `options.finalize` is False; the experiment folder."""
    return run_experiment(options, finalize=_finalize)


def _finalize(folder: Path, options: SearchOptions, data, externals) -> None:
    shared = {f.name: getattr(options, f.name) for f in fields(SharedOptions)}
    finalize(FinalizeOptions(experiment=str(folder), **shared), data=data, externals=externals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.split("\n\n")[0])
    add_flags(p, SearchOptions, profiles=PROFILES)
    return p


def main(argv: list[str] | None = None) -> int:
    options = from_flags(build_parser().parse_args(argv), SearchOptions)
    return handle_errors(lambda: run_search(options), interrupted="interrupted: continue with --resume --name <name>")


if __name__ == "__main__":
    sys.exit(main())
