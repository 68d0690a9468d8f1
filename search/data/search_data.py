"""The data of a search, set up in one pass: where it is, loaded with the search's options (decoded
by Ray tasks over the cluster, kept in memory or in the disk store), audited (optionally without the
copies that leak across splits), and the external test sets decoded like it. `ingest.dataset` does
the loading itself.

Example:
    >>> check_before_ray(options)                   # the layout of the data and of the external sets
    >>> ready = set_up(options, fingerprint=None)   # Ray running: decoded, audited, external sets loaded
    >>> write_audit(folder, ready.audit, ready.data)  # data_report.json, data_report.md, data_preview.png
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from core.choices import DATA_ENV
from core.formatting import size
from core.errors import UserError
from ingest.dataset import Dataset, check_data, check_every_split_has_every_class, load_dataset
from ingest.leakage import audit_dataset, dedupe as drop_duplicates, render, summary_lines
from search.data.external_sets import External, check_externals, like, load_externals
from search.options import SearchOptions
from search.outputs.evaluate import positive_class
from search.outputs.plots import plot_preview
from search.outputs.records import write_atomic, write_json

# --data-store auto keeps the decoded images in the object store up to this share of the smallest
# trial node's store: the rest is for checkpoints, results and the trials' own objects
AUTO_STORE_SHARE = 0.5

# PneumoniaMNIST (2.4 MB, CC BY 4.0; default_data/README.md): the search runs anywhere, offline
PACKAGED_DATA = Path(__file__).parents[1] / "default_data" / "pneumoniamnist.npz"


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


@dataclass
class SearchData:
    """A search's data, ready: the Dataset (audited; leaking copies dropped unless --no-dedupe), the
    audit, the external test sets decoded like it, and the seconds decoding and the audit took."""

    data: Dataset
    audit: dict
    externals: list[External]
    seconds: float


def check_before_ray(o: SearchOptions) -> None:
    """What needs neither Ray nor a decoded image: the data's layout and the external sets' options."""
    check_data(data_path(o.data), group_column=o.group_column, strata_columns=tuple(o.strata or ()))
    check_externals(o.external, o.class_map)


def set_up(o: SearchOptions, *, fingerprint: str | None) -> SearchData:
    """The data of a search with options `o` (profile filled in; `fingerprint`: a resumed search's,
    which the data must still have), audited, and its external sets; a bad --positive-class fails here."""
    started = time.time()
    data = load_search_data(data_path(o.data), image_size=o.image_size, channels=o.channels, seed=o.seed,
                            group_column=o.group_column, skip_corrupt=o.skip_corrupt, subset=o.subset,
                            fingerprint=fingerprint, ct_window=o.ct_window, store=o.data_store, cache=o.data_cache,
                            trial_resources=(o.cpus_per_trial, o.gpus_per_trial or 0),
                            strata_columns=tuple(o.strata or ()))
    positive_class(data.class_names, o.positive_class)
    data, audit = audited(data, dedupe=o.dedupe)
    seconds = time.time() - started
    externals = load_externals(o.external, o.class_map, **like(data), ct_window=o.ct_window, skip_corrupt=o.skip_corrupt)
    return SearchData(data=data, audit=audit, externals=externals, seconds=seconds)


def load_search_data(path: Path, *, image_size, channels: int, seed: int, group_column: str | None = None,
                     skip_corrupt: bool = False, subset: int | None = None, fingerprint: str | None = None,
                     ct_window: str = "lung", store: str = "memory", cache: str | None = None,
                     trial_resources: tuple[float, float] = (1, 0), strata_columns: tuple[str, ...] = ()) -> Dataset:
    """The data as a search loads it; with `fingerprint`, it must be the data that search ran on.
    When Ray runs, the files are decoded by Ray tasks spread over the cluster. `store` "auto" picks
    memory or disk by the decoded size (see `auto_store`; `trial_resources`: a trial's CPUs and GPUs).

    Raises:
        UserError: bad data (see `ingest.dataset.load_dataset`), or another fingerprint.
    """
    data = load_dataset(path, image_size=image_size, channels=channels, seed=seed, group_column=group_column,
                        skip_corrupt=skip_corrupt, subset=subset, ct_window=ct_window, cache=cache,
                        store=(lambda nbytes: auto_store(nbytes, *trial_resources)) if store == "auto" else store,
                        run_chunks=ray_chunks if ray.is_initialized() else None, strata_columns=strata_columns)
    if fingerprint and data.fingerprint != fingerprint:
        raise UserError(f"the data at {path} is not the data the search ran on (fingerprint {fingerprint}, "
                        f"now {data.fingerprint}); point --data at that data, or start a new search")
    return data


def auto_store(nbytes: int, cpus: float, gpus: float) -> str:
    """"memory" when the decoded images fit in `AUTO_STORE_SHARE` of the object store of the smallest
    live node that can run a trial (`cpus`, `gpus`), else "disk"; the console says which and why.
    With no such node yet (an autoscaler adds them), the smallest live node's store decides."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    trial_nodes = [r for r in nodes if r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus]
    if not nodes:
        return "memory"
    smallest = min(r.get("object_store_memory", 0) for r in trial_nodes or nodes)
    store = "memory" if nbytes <= AUTO_STORE_SHARE * smallest else "disk"
    which = "the smallest node that can run a trial" if trial_nodes else "the smallest node (none can run a trial yet)"
    print(f"data store: {store} (--data-store auto): the decoded images take {size(nbytes)}, "
          f"{'within' if store == 'memory' else 'more than'} {AUTO_STORE_SHARE:.0%} of the {size(smallest)} object "
          f"store of {which}" + ("; trials read their batches from the cache on disk" if store == "disk" else ""),
          flush=True)
    return store


def ray_chunks(fn, chunks: list, kwargs: dict):
    """`(k, fn(chunks[k], **kwargs))` as Ray tasks finish, spread over the cluster's nodes (a few per
    CPU in flight, so the driver never holds more than those results); `(None, None)` after 10 s
    without one (tasks waiting for CPUs an autoscaler adds), so the caller can still print progress."""
    task = ray.remote(fn).options(num_cpus=1, scheduling_strategy="SPREAD", max_retries=2)
    in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending, queue = {}, list(enumerate(chunks))[::-1]
    while queue or pending:
        while queue and len(pending) < in_flight:
            k, chunk = queue.pop()
            pending[task.remote(chunk, **kwargs)] = k
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=10)
        yield (pending.pop(ready[0]), ray.get(ready[0])) if ready else (None, None)


PREVIEW = "data_preview.png"


def audited(data: Dataset, *, dedupe: bool) -> tuple[Dataset, dict]:
    """The data audit, printed; with `dedupe` the leaking copies dropped (and named)."""
    report = audit_dataset(data)
    print("\n".join(summary_lines(report)), flush=True)
    if dedupe:
        data, dropped = drop_duplicates(data, report)
        report["deduped"] = dropped
        report["counts_after_dedupe"] = data.counts()
        check_every_split_has_every_class(data, after=f" once the {len(dropped)} copies of images in a later split "
                                                      f"are dropped (--no-dedupe keeps them)")
        print(f"  dropped {len(dropped)} copies found in a later split (--no-dedupe keeps them): "
              f"{'; '.join(dropped) or 'none'}", flush=True)
    return data, report


def write_audit(folder: Path, report: dict, data: Dataset) -> None:
    """`data_report.json`, `data_report.md`, and `data_preview.png` (which the report names): a few
    training images per class as the trials receive them (decoded, windowed, inverted where the file
    says, resized; before augmentation), so that a wrong window or an inverted class shows at a glance."""
    plot_preview(data, folder / PREVIEW)
    report = {**report, "preview": PREVIEW}
    write_json(folder / "data_report.json", report)
    write_atomic(folder / "data_report.md", lambda p: p.write_text(render(report)))
