"""Every option of a search and of finalize, as plain data with one default each, and the checks
at the boundary. Each field carries its command-line help and its allowed values, so the flags
(`search.cli.add_flags`) and the checks come from the same place.

Example:
    >>> check_search(SearchOptions(space="tiny", max_epochs=0))   # UserError naming the flag, value, what is allowed
    >>> with_profile(SearchOptions(space="tiny"), "cpu").num_samples
    24
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from core.choices import (DATA_ENV, MEMORY_FORMATS, METRIC_MODES, PRECISIONS, SAMPLER_NAMES, WEIGHTS, check_ct_window,
                          check_image_size)
from core.errors import UserError
from spaces import UnknownSpace, get_space, list_spaces

PROFILES = {
    # a laptop-class CPU: few epochs, two trials at a time on two cores; images at 32 px when they
    # are MedMNIST-sized, else at 64 px (see ingest.image_file.auto_image_size)
    "cpu": dict(image_size="auto", max_epochs=8, grace_period=1, num_samples=24, batch_size="auto",
                cpus_per_trial=1, gpus_per_trial=0, time_budget=900, early_size=0),
    # GPU workers: ImageNet resolution and a longer search
    "gpu": dict(image_size=224, max_epochs=30, grace_period=3, num_samples=64, batch_size="auto",
                cpus_per_trial=4, gpus_per_trial=1, time_budget=None, early_size=0),
}
# --folds auto: cross-validate when train+val is small. Below about 2,000 images one validation split
# of ~10% holds a few dozen to a few hundred images, too few to tell the top configurations apart
# (BENCHMARKS.md, issue 15); above it, K-fold would cost K times the compute for little gain.
AUTO_FOLDS, AUTO_FOLDS_BELOW = 5, 2000
# --batch-size auto: the largest of these that still gives an epoch this many optimizer steps. A small
# data set at batch 64 gets 3 steps an epoch and stays undertrained in a CPU profile's 8 epochs (the
# 3-class X-rays: test accuracy 0.76 at batch 64, 0.94 at 16, BENCHMARKS.md issue 15); large ones keep 64.
AUTO_BATCH_SIZES, MIN_STEPS_PER_EPOCH = (64, 32, 16, 8), 12


def option(default, help: str, **check):
    """A field with its help text; `check` may hold `type` (also the flag's parser), `choices`,
    `above` (strictly), `at_least`, `repeat` (a flag given any number of times: a list), or `bare`
    (the value of the flag given without one)."""
    return field(default=default, metadata={"help": help, **check})


def int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


@dataclass(kw_only=True)
class SharedOptions:
    """The options `search.run` and `search.finalize` share: where Ray runs, and the final model."""

    address: str | None = option(None, "join a running Ray cluster: auto, or the head's host:6379")
    top_k: int = option(3, "distinct best configurations to retrain and ensemble", type=int, at_least=1)
    seeds: int = option(1, "retrainings of each configuration, with seeds seed, seed+1, ...; a member "
                           "averages them", type=int, at_least=1)
    warm_restart: str = option("best", "after its schedule, a final network trains it once more from half its learning "
                                       "rate (a warm restart). best: the best configuration's networks; all: every "
                                       "member's; none",
                               choices=("best", "all", "none"))
    refit_on_val: bool = option(False, "also retrain on train+val for the saved models (threshold and "
                                       "ensemble weights still come from validation predictions of the "
                                       "train-only models)")
    positive_class: str | None = option(None, "class the threshold, sensitivity and specificity are for "
                                              "(default: the COVID class, or the abnormal one of two)")
    external: list[str] | None = option(None, "a labelled data set from elsewhere (image folder, .npz or CSV manifest) "
                                              "the final model is tested on as on the internal test, its threshold "
                                              "unchanged (repeatable): a report section per set (search/final/external.py)",
                                        repeat=True)
    class_map: list[str] | None = option(None, "THEIRS=OURS: the model's class for an external set's class whose name "
                                               "differs beyond case, spaces and punctuation (repeatable)", repeat=True)
    keep_checkpoints: str = option("used", "after finalize, the trial checkpoints kept: used (the members' trials "
                                           "and unfinished ones --resume continues; the rest are removed) or all",
                                   choices=("used", "all"))


@dataclass(kw_only=True)
class SearchOptions(SharedOptions):
    """Every option of a search, as plain data (recorded in search_config.json). None means: take
    the profile's value."""

    space: str = option("backbones", f"search space: {', '.join(list_spaces())}")
    data: str | None = option(None, f"image folder, MedMNIST-style .npz or CSV manifest (default: ${DATA_ENV})")
    profile: str = option("auto", "defaults for size, epochs and trials; auto: gpu when the cluster has GPUs",
                          choices=("auto", *PROFILES))
    num_samples: int | None = option(None, "trials to run", type=int, above=0)
    max_epochs: int | None = option(None, "epochs of a trial that is never stopped", type=int, above=0)
    grace_period: int | None = option(None, "epochs before ASHA may stop a trial", type=int, above=0)
    reduction_factor: float = option(3.0, "ASHA keeps 1/this of trials per rung", type=float, at_least=2)
    scheduler: str = option("asha", "asha: stop weak trials early; fifo: run every trial to --max-epochs",
                            choices=("asha", "fifo"))
    cpus_per_trial: float | None = option(None, "CPUs per trial", type=float, above=0)
    gpus_per_trial: float | None = option(None, "GPUs per trial, fractions allowed", type=float, at_least=0)
    max_concurrent: int | None = option(None, "trials at once (default: what the cluster fits)", type=int,
                                        above=0)
    storage: str = option("experiments", "experiment root (a path every node reaches)")
    name: str | None = option(None, "experiment name (default: <space>-<date>-<time>)")
    resume: bool = option(False, "continue the experiment --name in --storage")
    time_budget: float | None = option(None, "stop the search after this many seconds", type=float, above=0)
    seed: int = option(0, "seed of the split, the sampler and the trials", type=int, at_least=0)
    metric: str = option("val_auc", "validation metric to optimise", choices=tuple(METRIC_MODES))
    sampler: str = option("tpe", "Optuna sampler", choices=SAMPLER_NAMES)
    backbones: str | None = option(None, "comma-separated timm names replacing the space's backbones")
    recipes: str | None = option(None, "comma-separated recipe names: run only these of --space recipes")
    weights: str = option("imagenet", "ImageNet weights (local --weights-dir, installed package, or timm's "
                                      "hub), or random initialisation", choices=WEIGHTS)
    weights_dir: str | None = option(None, "folder of local checkpoints named <backbone>.pth or .safetensors")
    image_size: int | str | None = option(None, "side of the decoded images; auto: 32 px for images up to "
                                                "48 px, else 64", type=int_or_auto)
    channels: int = option(1, "1 grayscale, 3 RGB", type=int, choices=(1, 3))
    precision: str = option("auto", "autocast of training; auto: the fastest measured on the machine for each "
                                    "backbone (trainables/execution.py; prediction: bf16 or fp16 on a GPU, fp32 on a "
                                    "CPU)", choices=PRECISIONS)
    memory_format: str = option("auto", "tensor layout of the networks; auto: the faster measured on the machine for "
                                        "each backbone", choices=MEMORY_FORMATS)
    early_size: int | str | None = option(None, "side the first rung's epochs (the first --grace-period) train and "
                                                "validate at, so that the trials ASHA stops there cost less; 0: the "
                                                "full size throughout; auto: half the image size", type=int_or_auto)
    batch_size: int | str | None = option(None, f"training batch size; auto: the largest of "
                                                f"{', '.join(map(str, AUTO_BATCH_SIZES))} that gives an epoch at least "
                                                f"{MIN_STEPS_PER_EPOCH} steps", type=int_or_auto)
    data_store: str = option("auto", "where trials read the decoded images from: memory (the Ray object store, "
                                     "fastest), disk (the cache, read batch by batch), or auto: memory when the decoded "
                                     "images fit in half the object store of the smallest node that runs trials",
                             choices=("auto", "memory", "disk"))
    data_cache: str | None = option(None, "folder of decoded data sets, reused by every later search of the same "
                                          "files (default: <storage>/data-cache; on a cluster a path every node reaches)")
    ct_window: str = option("lung", "window of CT DICOM images in HU: lung (centre -600, width 1500), mediastinum "
                                    "(40, 400), file (the file's own), or 'centre,width'")
    group_column: str | None = option(None, "manifest column of patient ids (detected by name when obvious)")
    strata: list[str] | None = option(None, "manifest column (a site, a scanner) to break the final report's test "
                                            "figures down by (repeatable); DICOM headers' manufacturer, model, sex, "
                                            "age and view are used without asking", repeat=True)
    skip_corrupt: bool = option(False, "leave unreadable images out, with a warning")
    dedupe: bool = option(True, "keep a file that appears in two splits in both (by default only the copy in the "
                                "later split stays: train, then val, then test; the audit names them)")
    folds: int | str = option("auto", f"cross-validate every trial over K folds of train+val (1: one validation "
                                      f"split); auto: {AUTO_FOLDS} when train+val holds fewer than "
                                      f"{AUTO_FOLDS_BELOW:,} images, else 1", type=int_or_auto)
    subset: int | None = option(None, "at most this many images per split (smoke runs)", type=int, above=0)
    max_retries: int = option(2, "retries of a trial whose worker fails", type=int, at_least=0)
    stop_rule: bool = option(True, "run the whole budget (by default the search stops once the best trial is within "
                                   "its validation error of the metric's ceiling, or --stop-patience trials the sampler "
                                   "proposed in a row have not beaten it by more than that: search/engine/stop_rule.py)")
    stop_patience: int | None = option(None, "proposed trials in a row that add nothing before the stop rule ends "
                                             "the search (default: a sixth of --num-samples, at least 4)",
                                       type=int, above=0)
    share_idle_cores: bool = option(True, "keep every CPU trial and finalize retraining at the CPUs it asked for "
                                          "(by default, once none waits, a node's idle cores are shared among those "
                                          "still running there)")
    finalize: bool = option(True, "stop after the search: no retraining, ensemble or report (python -m "
                                  "search.finalize does it later)")
    mlflow: str | None = option(None, "log every trial as an MLflow run (its config, every epoch's metrics, ASHA's "
                                      "stops) and the leaderboard, report and final model on a parent run; alone: a "
                                      "SQLite store in the experiment folder (mlflow.db), or a tracking URI "
                                      "(pip install 'lung-search[tracking]')", bare="experiment")
    warm_start: list[str] | None = option(None, "an earlier search of the same space and metric to start from "
                                                "(repeatable): its trials go to the sampler before its first "
                                                "proposal, and the backbones it tried are not swept again",
                                          repeat=True)


@dataclass(kw_only=True)
class FinalizeOptions(SharedOptions):
    """Every option of a finalize run, as plain data (recorded in metrics.json)."""

    experiment: str = field(metadata={"help": "the search's folder: <storage>/<name>"})
    epochs: str = option("full", "retrain to the config's max epochs, or to the best epoch its trial found",
                         choices=("full", "best"))
    bootstrap: int = option(1000, "bootstrap resamples for the 95%% intervals", type=int, at_least=1)
    data: str | None = option(None, "the search's data, if it moved since (checked by fingerprint)")
    cpus_per_model: float | None = option(None, "CPUs per retraining (default: the search's per trial)",
                                          type=float, above=0)
    gpus_per_model: float | None = option(None, "GPUs per retraining (default: the search's per trial)",
                                          type=float, at_least=0)


# a resumed search runs with the options it started with: only where it runs, for how long (a new
# --time-budget, for this run) and what happens after it may change
# (and where the decoded images live: the fingerprint still checks they are the same data)
CHANGEABLE_ON_RESUME = ("storage", "time_budget", "finalize", "data_store", "data_cache",
                        *(f.name for f in fields(SharedOptions)))


def resolve_batch_size(batch_size: int | str, train_images: int) -> int:
    """The batch size `--batch-size` means for trials that train on `train_images` images."""
    if batch_size != "auto":
        return int(batch_size)
    return next((b for b in AUTO_BATCH_SIZES if train_images // b >= MIN_STEPS_PER_EPOCH), AUTO_BATCH_SIZES[-1])


def resolve_early_size(early_size: int | str, *, image_size: int, grace_period: int, max_epochs: int,
                       scheduler: str) -> int:
    """The side `--early-size` means for a search at `image_size` (0: off). Off where there is no first
    rung to make cheap: FIFO, or a grace period as long as the trial."""
    if scheduler != "asha" or grace_period >= max_epochs:
        return 0
    size = max(8, image_size // 2) if early_size == "auto" else int(early_size)
    if size >= image_size:
        raise UserError(f"--early-size {size} must be below the image size {image_size} (0 turns it off)")
    return size


def early_rung(o: SearchOptions) -> dict:
    """The trial config keys of a cheap first rung: its epochs (the grace period) at `--early-size`."""
    return {"early_size": o.early_size, "early_epochs": o.grace_period} if o.early_size else {}


def resolve_stop_patience(patience: int | None, num_samples: int) -> int:
    """The patience `--stop-patience` means for a search of `num_samples` trials."""
    return patience if patience is not None else max(4, math.ceil(num_samples / 6))


def resolve_folds(folds: int | str, pool: int) -> int:
    """The number of folds `--folds` means for a train+val pool of `pool` images."""
    if folds != "auto":
        return int(folds)
    return AUTO_FOLDS if pool < AUTO_FOLDS_BELOW else 1


def with_profile(options: SearchOptions, profile: str) -> SearchOptions:
    """The options with every unset (None) value taken from `profile`, checked as a search will use
    them.

    Raises:
        UserError: as `check_search`; when a value the profile filled in takes part, it says so.
    """
    filled = [k for k in PROFILES[profile] if getattr(options, k) is None]
    o = replace(options, **{k: PROFILES[profile][k] for k in filled})
    try:
        check_search(o)
    except UserError as exc:
        named = [f"--{k.replace('_', '-')} {getattr(o, k)}" for k in filled if f"--{k.replace('_', '-')} " in str(exc)]
        if not named:
            raise
        raise UserError(f"{exc} ({', '.join(named)} from the {profile} profile: set it to fit)") from None
    return o


def check_fields(options) -> None:
    """Every field against its declared type, choices and bounds.

    Raises:
        UserError: naming the flag, the value and what is allowed.
    """
    for f in fields(options):
        value, meta = getattr(options, f.name), f.metadata
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"unknown {f.name.replace('_', ' ')} {value!r}; choose one of "
                            f"{', '.join(map(str, meta['choices']))}")
        kind = meta.get("type")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, kind))):
            raise UserError(f"{flag} must be a number{' (whole)' if kind is int else ''}, got {value!r}")
        if "above" in meta and not value > meta["above"]:
            raise UserError(f"{flag} must be positive, got {value}")
        if "at_least" in meta and value < meta["at_least"]:
            raise UserError(f"{flag} must be at least {meta['at_least']}, got {value}")


def check_search(o: SearchOptions) -> None:
    """All the checks of a search's options that need neither the data nor Ray; run on the options
    as given and again on the options a search really uses (profile values filled in).

    Raises:
        UserError: the first bad option, named with its value and what is allowed.
    """
    check_fields(o)
    try:
        get_space(o.space)
    except UnknownSpace as exc:
        raise UserError(str(exc)) from None
    if o.image_size is not None:
        check_image_size(o.image_size)
    check_ct_window(o.ct_window)
    if o.data_cache and Path(o.data_cache).expanduser().exists() and not Path(o.data_cache).expanduser().is_dir():
        raise UserError(f"--data-cache {o.data_cache!r} is a file; give a folder (it is created if missing)")
    if o.batch_size not in (None, "auto") and (isinstance(o.batch_size, bool) or not isinstance(o.batch_size, int)
                                               or o.batch_size < 2):
        raise UserError(f"--batch-size must be 'auto' or a whole number, 2 or more; got {o.batch_size!r}")
    if o.folds != "auto" and (isinstance(o.folds, bool) or not isinstance(o.folds, int) or o.folds < 1):
        raise UserError(f"--folds must be 'auto' or a whole number, 1 (no cross-validation) or more; got {o.folds!r}")
    if o.gpus_per_trial and o.gpus_per_trial > 1 and o.gpus_per_trial != int(o.gpus_per_trial):
        raise UserError(f"--gpus-per-trial above 1 must be a whole number, got {o.gpus_per_trial}")
    if o.early_size not in (None, "auto") and (isinstance(o.early_size, bool) or not isinstance(o.early_size, int)
                                               or not (o.early_size == 0 or o.early_size >= 8)):
        raise UserError(f"--early-size must be 'auto', 0 (off) or a whole number of pixels, 8 or more; "
                        f"got {o.early_size!r}")
    if isinstance(o.early_size, int) and o.early_size and isinstance(o.image_size, int) \
            and o.early_size >= o.image_size:
        raise UserError(f"--early-size {o.early_size} must be below --image-size {o.image_size} (0 turns it off)")
    if o.grace_period and o.max_epochs and o.grace_period > o.max_epochs:
        raise UserError(f"--grace-period {o.grace_period} exceeds --max-epochs {o.max_epochs}")
    if o.resume and not o.name:
        raise UserError("--resume needs --name: the experiment to continue")
    if o.weights_dir and not Path(o.weights_dir).expanduser().is_dir():
        raise UserError(f"--weights-dir {o.weights_dir!r} is not a folder")
    if o.strata is not None and (isinstance(o.strata, str) or not all(isinstance(c, str) and c for c in o.strata)):
        raise UserError(f"--strata must be a list of manifest column names, got {o.strata!r}")
    if o.warm_start is not None and (isinstance(o.warm_start, str) or not all(isinstance(w, str) for w in o.warm_start)):
        raise UserError(f"--warm-start must be a list of experiment folders, got {o.warm_start!r}")
    if o.warm_start and get_space(o.space).fixed:
        raise UserError(f"--warm-start applies to a space the sampler searches, not the fixed space {o.space!r}")
    if o.mlflow is not None:
        from search.engine.tracking import check_mlflow  # Ray's and MLflow's imports only for a search that logs
        check_mlflow(o.mlflow)
