"""The data of a search: where it is, loaded with the search's options, and audited (optionally
without the copies that leak across splits). `trainables.data` does the loading itself.

Example:
    >>> data = load_search_data(data_path(None), image_size=32, channels=1, seed=0)
    >>> data, report = audited(data, dedupe=True)
    >>> write_audit(folder, report)                 # data_report.json and data_report.md
"""
from __future__ import annotations

import os
from pathlib import Path

from search.records import write_atomic, write_json
from trainables import UserError
from trainables.audit import audit_dataset, dedupe as drop_duplicates, render, summary_lines
from trainables.data import Dataset, load_dataset

DATA_ENV = "SEARCH_DATA"
# PneumoniaMNIST (2.4 MB, CC BY 4.0; default_data/README.md): the search runs anywhere, offline
PACKAGED_DATA = Path(__file__).parent / "default_data" / "pneumoniamnist.npz"


def data_path(given: str | None) -> Path:
    """`given`, else $SEARCH_DATA, else MedMNIST's download of PneumoniaMNIST ($MEDMNIST_ROOT or
    ~/.medmnist), else the copy of it that ships with the package.

    Raises:
        UserError: the path given does not exist.
    """
    path = given or os.environ.get(DATA_ENV)
    if not path:
        medmnist = Path(os.environ.get("MEDMNIST_ROOT", "~/.medmnist")).expanduser() / "pneumoniamnist.npz"
        return medmnist if medmnist.exists() else PACKAGED_DATA
    if not Path(path).expanduser().exists():
        raise UserError(f"data path {path!r} does not exist")
    return Path(path).expanduser()


def load_search_data(path: Path, *, image_size, channels: int, seed: int, group_column: str | None = None,
                     skip_corrupt: bool = False, subset: int | None = None,
                     fingerprint: str | None = None) -> Dataset:
    """The data as a search loads it; with `fingerprint`, it must be the data that search ran on.

    Raises:
        UserError: bad data (see `trainables.data.load_dataset`), or another fingerprint.
    """
    data = load_dataset(path, image_size=image_size, channels=channels, seed=seed, group_column=group_column,
                        skip_corrupt=skip_corrupt, subset=subset)
    if fingerprint and data.fingerprint != fingerprint:
        raise UserError(f"the data at {path} is not the data the search ran on (fingerprint {fingerprint}, "
                        f"now {data.fingerprint}); point --data at that data, or start a new search")
    return data


def audited(data: Dataset, *, dedupe: bool) -> tuple[Dataset, dict]:
    """The data audit, printed; with `dedupe` the leaking copies dropped (and named)."""
    report = audit_dataset(data)
    print("\n".join(summary_lines(report)), flush=True)
    if dedupe:
        data, dropped = drop_duplicates(data, report)
        report["deduped"] = dropped
        report["counts_after_dedupe"] = data.counts()
        print(f"  dropped {len(dropped)} copies found in a later split (--no-dedupe keeps them): "
              f"{'; '.join(dropped) or 'none'}", flush=True)
    return data, report


def write_audit(folder: Path, report: dict) -> None:
    """`data_report.json` and `data_report.md` in `folder`."""
    write_json(folder / "data_report.json", report)
    write_atomic(folder / "data_report.md", lambda p: p.write_text(render(report)))
