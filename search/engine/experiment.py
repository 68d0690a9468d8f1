"""A search from start to end: options checked, Ray started or joined, the data loaded and audited,
the Tuner built (or restored for --resume) and run, the leaderboards and plots written, then the
step after it (`finalize`, given by `search.run`: the final model) unless the options say not to.

Example:
    >>> folder = run_experiment(SearchOptions(space="tiny", data="pneumoniamnist.npz", num_samples=4, finalize=False))
    >>> pd.read_csv(folder / "leaderboard.csv").head()
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import ray
import torch
from ray import tune

from core.errors import UserError
from search.engine.checkpoints import check_free_space, checkpoint_sizes, in_hand, low_space, remove_torn
from search.engine.cluster import check_fits, connected, engine_messages, slots
from search.engine.cores import ShareIdleCores, core_budget
from search.data.search_data import check_before_ray, data_path, set_up, write_audit
from search.data.external_sets import External
from search.engine.leaderboard import LeaderboardCallback, print_summary
from search.options import (CHANGEABLE_ON_RESUME, SearchOptions, check_search,
                            early_rung, resolve_batch_size, resolve_early_size, resolve_folds,
                            resolve_stop_patience, with_profile)
from search.outputs.plots import plot_progress
from search.outputs.records import read_search_record, versions, write_atomic, write_json, write_timings
from search.engine.stop_rule import stop_record
from search.engine.tracking import BestEpochTensorBoard, MlflowTracking, log_outputs
from search.engine.tuner import (SchedulerState, bind_space, fit, make_scheduler, make_searcher, make_tuner, restore_tuner,
                                 with_data)
from search.engine.warm_start import SCORED_BY, Earlier, read_studies, translate, tried_backbones
from spaces import Space, get_space
from trainables.config import check_backbone_names, validate_config
from ingest.dataset import Dataset
from core.choices import METRIC_MODES
from trainables.models import num_stages, weights_source
from trainables.trainable import train_classifier

# what a search writes that its parent MLflow run keeps (finalize adds final/)
SEARCH_OUTPUTS = ("leaderboard.csv", "leaderboard_by_backbone.csv", "search_progress.png", "optuna_trials.csv",
                  "data_report.md", "search_config.json", "timings.json")


# what runs after a finished search, in its Ray session: (folder, options, data, external sets)
Finalize = Callable[[Path, SearchOptions, Dataset, list[External]], None]


@dataclass
class Search:
    """A search ready to run: the options as used (profile values filled in, data path absolute,
    image size resolved), where it writes, and what it runs on."""

    options: SearchOptions
    profile: str
    folder: Path
    space: Space
    backbones: tuple[str, ...]
    stages: dict[str, int]  # feature stages per backbone: the range of freeze_depth
    first: list[dict]  # trials enqueued before the sampler draws: recipes, or one per backbone not warm-started
    data: Dataset
    audit: dict
    slots: int
    cluster: dict
    data_seconds: float  # decoding (or reading the cache) and the audit
    earlier: list[Earlier]  # the searches it starts from (--warm-start; none when resumed: its study has them)
    skipped: list[str]  # backbones not swept because the earlier searches tried them
    externals: list[External]  # --external sets, decoded as the data and their classes matched, before the search
    checkpoint_sizes: tuple[float, float] = (0.0, 0.0)  # bytes of one trial checkpoint: the largest, the mean


def run_experiment(options: SearchOptions, *, finalize: Finalize | None = None) -> Path:
    """Run (or resume) a search and return its experiment folder. When it finished and
    `options.finalize`, `finalize(folder, options, data, externals)` runs next, in the same Ray session
    and with the data already loaded.

    Raises:
        UserError: bad options, data, weights or resources; nothing is written before the checks.
    """
    clock = {"started": time.time()}
    options, saved = _resumed(options)
    check_search(options)
    folder = Path(options.storage).expanduser().resolve() / (
        options.name or f"{options.space}-{time.strftime('%Y%m%d-%H%M%S')}")
    if folder.exists() and not options.resume:
        raise UserError(f"experiment {folder} already exists; pass --resume to continue it or choose "
                        f"another --name")
    _check_before_ray(options, folder)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the progress lines replace Ray's tables
    with connected(options.address):
        try:
            search = _prepare(options, folder, saved)
            tuner, searcher = _tuner(search)
        except KeyboardInterrupt:
            if not options.resume and folder.exists() and not (folder / "tuner.pkl").exists():
                shutil.rmtree(folder)  # made by this command, before any trial: nothing to resume
            raise KeyboardInterrupt("interrupted before the search started; run the same command again") from None
        write_audit(folder, search.audit, search.data)
        clock["fit_started"] = time.time()
        reserve = in_hand(search.checkpoint_sizes[0], search.slots)
        with engine_messages(folder), _disk_full(folder):
            ended = fit(tuner, time_budget=search.options.time_budget, low_space=low_space(folder.parent, reserve))
            interrupted, full = ended == "interrupted", ended if ended not in (None, "interrupted") else None
            clock["fit_ended"] = time.time()
            finished, clock["stop_rule"] = _after_fit(search, searcher, interrupted=interrupted or bool(full),
                                                      fit_seconds=clock["fit_ended"] - clock["fit_started"])
            clock["search_ended"], clock["data_seconds"] = time.time(), search.data_seconds
            write_timings(folder, clock, slots=search.slots, cpus_per_trial=search.options.cpus_per_trial)  # finalize reads it
            if search.options.mlflow is not None:
                log_outputs(folder, search.options.mlflow, [("search", folder / name) for name in SEARCH_OUTPUTS])
        o = search.options
        if finished and o.finalize and finalize is not None:
            try:
                finalize(folder, o, search.data, search.externals)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"interrupted while finalizing; the search is complete: finish with "
                                        f"python -m search.finalize --experiment {folder}") from None
    write_timings(folder, clock, slots=search.slots, cpus_per_trial=search.options.cpus_per_trial)
    if interrupted:
        raise KeyboardInterrupt(f"interrupted: continue with {_resume_command(folder)}")
    if full:
        raise UserError(f"{full}; free space there and continue with {_resume_command(folder)}, or copy {folder} "
                        f"to a roomier disk and continue it there with --storage <its parent folder>")
    return folder


@contextmanager
def _disk_full(folder: Path):
    """A write that found the storage full (the space kept in hand went faster than the check every
    second saw) is one error line, like the stop before it: what was written stays resumable."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise UserError(f"{folder.parent} is full ({exc.strerror}): the search stopped; free space there and "
                        f"continue with {_resume_command(folder)}, or copy {folder} to a roomier disk and continue "
                        f"it there with --storage <its parent folder>") from None


def _check_before_ray(options: SearchOptions, folder: Path) -> None:
    """The checks that need neither Ray nor a decoded image, so that a bad path, manifest, storage or
    profile clash answers in seconds: the data's layout, that the experiment folder can be made, and
    (on this machine, where the profile is known now) the options with the profile filled in."""
    check_before_ray(options)
    check_backbone_names(options.backbones or "")
    if not options.resume:
        read_studies(options.warm_start or [], space=options.space, metric=options.metric, fingerprint="")
    writable = next(p for p in (folder, *folder.parents) if p.exists())
    if not writable.is_dir() or not os.access(writable, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the experiment folder {folder}: {writable} is "
                        f"{'not a folder' if not writable.is_dir() else 'not writable'}; choose another --storage")
    if not options.address:
        with_profile(options, options.profile if options.profile != "auto" else
                     "gpu" if torch.cuda.is_available() else "cpu")


def _resumed(options: SearchOptions) -> tuple[SearchOptions, dict | None]:
    """With --resume: the options the search started with (only where it runs and what happens
    after it may change) and its record."""
    if not options.resume:
        return options, None
    if not options.name:
        raise UserError("--resume needs --name: the experiment to continue")
    saved = read_search_record(Path(options.storage).expanduser().resolve() / options.name)
    kept = {k: v for k, v in saved["options"].items() if k not in CHANGEABLE_ON_RESUME}
    return replace(options, **{**kept, "resume": True}), saved


def _prepare(options: SearchOptions, folder: Path, saved: dict | None) -> Search:
    """The checks that need Ray or the data, then everything a search runs on."""
    cluster = ray.cluster_resources()
    profile = options.profile if options.profile != "auto" else ("gpu" if cluster.get("GPU") else "cpu")
    path = data_path(options.data)
    space = _space(options)
    if space.fixed and options.num_samples is None:  # a fixed space runs each of its points once
        options = replace(options, num_samples=len(space.points))
    o = replace(with_profile(options, profile), name=folder.name, data=str(path.resolve()),
                data_cache=str(Path(options.data_cache or folder.parent / "data-cache").expanduser().resolve()))
    check_fits(o.cpus_per_trial, o.gpus_per_trial or 0, task="run a trial", cluster=bool(o.address),
               flags="--cpus-per-trial / --gpus-per-trial")
    ready = set_up(o, fingerprint=saved["data"]["fingerprint"] if saved else None)
    data = ready.data
    o.image_size = int(data.images.shape[1])  # "auto" resolved, recorded for finalize and --resume
    pool = len(data.indices("train")) + len(data.indices("val"))
    o.folds = resolve_folds(o.folds, pool)
    if o.folds > 1:
        data.cv_folds(o.folds, o.seed)  # too few images or patients for the folds fails now
    o.early_size = resolve_early_size(o.early_size, image_size=o.image_size, grace_period=o.grace_period,
                                      max_epochs=o.max_epochs, scheduler=o.scheduler)
    o.batch_size = resolve_batch_size(o.batch_size, pool - pool // o.folds if o.folds > 1 else len(data.indices("train")))
    backbones = _backbones(space, o, profile)
    stages = {b: num_stages(b) for b in backbones}
    first = space.first_trials(backbones, pretrained=o.weights == "imagenet")
    for config in _first_configs(space, o, backbones, stages, first, data.num_classes):
        if config["weights"] == "imagenet":
            weights_source(config["backbone"], "imagenet", o.weights_dir)  # fails now, not in every trial
    earlier = [] if saved else read_studies(o.warm_start or [], space=o.space, metric=o.metric,
                                            fingerprint=data.fingerprint,
                                            scored={key: getattr(o, key) for key in SCORED_BY})
    skipped = saved.get("warm_start", {}).get("skipped_backbones", []) if saved else \
        sorted(tried_backbones([t for e in earlier for t in e.trials]) & set(backbones))
    return Search(options=o, profile=profile, folder=folder, space=space, backbones=backbones, stages=stages,
                  first=[p for p in first if p.get("backbone") not in skipped], data=data, audit=ready.audit,
                  cluster=cluster, data_seconds=ready.seconds, earlier=earlier, skipped=skipped,
                  externals=ready.externals,
                  slots=o.max_concurrent or slots(o.cpus_per_trial, o.gpus_per_trial))


def _space(o: SearchOptions) -> Space:
    """The space to search; with --recipes only the named recipes of it."""
    space = get_space(o.space)
    if not o.recipes:
        return space
    known = [p.get("recipe") for p in space.points]
    if not space.fixed or not all(known):
        raise UserError(f"--recipes applies to --space recipes, not {space.name!r}")
    wanted = [n.strip() for n in o.recipes.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise UserError(f"unknown recipe(s) {unknown or o.recipes!r}; recipes: {', '.join(known)}")
    return replace(space, points=tuple(p for p in space.points if p["recipe"] in wanted))


def _backbones(space: Space, o: SearchOptions, profile: str) -> tuple[str, ...]:
    if o.backbones:
        if space.fixed:
            raise UserError(f"--backbones does not apply to the fixed space {space.name!r}")
        return tuple(b.strip() for b in o.backbones.split(",") if b.strip())
    return space.cpu_backbones if profile == "cpu" and space.cpu_backbones else space.backbones


def _first_configs(space: Space, o: SearchOptions, backbones, stages, first: list[dict],
                   num_classes: int) -> list[dict]:
    """The first trials' configs, drawn and validated now: each recipe, or one per backbone (so a
    bad backbone, or one whose weights cannot be reached, fails here and not in every trial)."""
    base = {"weights": o.weights, "image_size": o.image_size, "batch_size": o.batch_size,
            "max_epochs": o.max_epochs, **early_rung(o)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=o.seed))
    configs = []
    for point in first or [{"backbone": b} for b in backbones]:
        study.enqueue_trial(point)
        drawn = space.sample(study.ask(), backbones=backbones, stages=stages, pretrained=o.weights == "imagenet")
        configs.append(validate_config({**base, **drawn}, num_classes=num_classes))
    return configs


def _tuner(search: Search) -> tuple[tune.Tuner, object]:
    """The Tuner (new, or restored with its searcher's state for --resume) and its searcher."""
    o, folder = search.options, search.folder
    metric, mode = o.metric, METRIC_MODES[o.metric]
    space_fn = bind_space(search.space, backbones=search.backbones, stages=search.stages,
                          pretrained=o.weights == "imagenet")
    searcher = make_searcher(space_fn, metric=metric, mode=mode, sampler=o.sampler, seed=o.seed,
                             max_epochs=o.max_epochs, max_concurrent=search.slots, points=search.first, folder=folder,
                             stop_patience=_stop_patience(search),
                             val_counts=list(search.data.counts()["val"].values()))
    given, dropped = translate(search.earlier, space_fn, seed=o.seed)
    searcher.searcher.study.add_trials(given)  # before the first proposal: the sampler starts informed
    scheduler = make_scheduler(metric=metric, mode=mode, max_epochs=o.max_epochs, grace_period=o.grace_period,
                               reduction_factor=o.reduction_factor, first=search.first) if o.scheduler == "asha" else None
    callbacks = [LeaderboardCallback(folder, metric=metric, mode=mode, num_samples=o.num_samples,
                                     time_budget=o.time_budget, scheduler=scheduler),
                 BestEpochTensorBoard(metric=metric, mode=mode)]
    if o.mlflow is not None:
        callbacks.append(MlflowTracking(folder, uri=o.mlflow, metric=metric, scheduler=scheduler, options=asdict(o)))
    if scheduler is not None:
        callbacks.append(SchedulerState(scheduler))
    cores = None
    if o.share_idle_cores and not o.gpus_per_trial:
        name, cores = core_budget(f"cores-{folder.name}")
        callbacks.append(ShareIdleCores(name, num_samples=o.num_samples, cpus_per_trial=o.cpus_per_trial))
    trainable = with_data(train_classifier, search.data, {"cpu": o.cpus_per_trial, "gpu": o.gpus_per_trial},
                          cores=cores)
    _announce(search, asha=scheduler is not None, given=len(given), dropped=dropped)
    search.checkpoint_sizes = checkpoint_sizes(sorted({p["backbone"] for p in search.space.points if "backbone" in p})
                                               or search.backbones, o.folds)
    print(check_free_space(folder.parent, sizes=search.checkpoint_sizes, num_samples=o.num_samples,
                           slots=search.slots), flush=True)
    if o.resume:
        return restore_tuner(folder, trainable, searcher=searcher, scheduler=scheduler, callbacks=callbacks), searcher
    folder.mkdir(parents=True)
    write_json(folder / "search_config.json", {
        "options": asdict(o), "profile": search.profile, "space": search.space.name,
        "backbones": list(search.backbones), "data": search.data.summary(), "versions": versions(),
        "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cluster": search.cluster,
        "warm_start": {"from": [e.record(sum(t.user_attrs["warm_start_from"] == e.experiment for t in given))
                                for e in search.earlier], "skipped_backbones": search.skipped}})
    base_config = {"image_size": o.image_size, "batch_size": o.batch_size, "max_epochs": o.max_epochs,
                   "seed": o.seed, "folds": o.folds, "precision": o.precision, "memory_format": o.memory_format,
                   "weights": o.weights, "weights_dir": o.weights_dir, **early_rung(o)}
    tuner = make_tuner(trainable, searcher=searcher, scheduler=scheduler, num_samples=o.num_samples,
                       storage=str(folder.parent), name=folder.name,
                       base_config=base_config, callbacks=callbacks, max_retries=o.max_retries)
    return tuner, searcher


def _stop_patience(search: Search) -> int | None:
    """The stop rule's patience, or None where it does not run: turned off, a fixed space (its points
    run once each), or a loss measured on one validation split (no standard error to judge by)."""
    o = search.options
    if not o.stop_rule or search.space.fixed or (o.folds == 1 and o.metric == "val_loss"):
        return None
    return resolve_stop_patience(o.stop_patience, o.num_samples)


def _announce(search: Search, *, asha: bool, given: int, dropped: int) -> None:
    o, data, space = search.options, search.data, search.space
    for e in search.earlier:
        print(f"warm start: {len(e.trials)} trials of {e.experiment} ({'the same data' if e.same_data else 'other data: another fingerprint'})")
    if search.earlier:
        print(f"warm start: {given} trials given to the sampler before its first proposal"
              + (f" ({dropped} value(s) outside this space's ranges left out)" if dropped else "")
              + f"; not swept again: {', '.join(search.skipped) or 'no backbone'}")
    resources = {"cpu": o.cpus_per_trial, "gpu": o.gpus_per_trial}
    print(f"experiment: {search.folder}")
    print(f"data: {data.source} | classes {data.class_names} | "
          f"{ {s: sum(c.values()) for s, c in data.counts().items()} } | split {data.split_kind} | "
          f"fingerprint {data.fingerprint}")
    where = data.store
    print(f"data store: {where.get('store')}" + (f", decoded images cached in {where['cache']}"
                                                 + (" (reused)" if where.get("reused") else "") if where.get("cache") else ""))
    pool = len(data.indices("train")) + len(data.indices("val"))
    print(f"search: space {space.name} ("
          + (f"{len(space.points)} fixed point(s)" if space.fixed else f"{len(search.backbones)} backbones"
             + (f", each tried first at fixed values ({len(search.first)} trials) before the sampler takes over"
                if search.first else "")
             + (f" and not stopped before epoch {min(math.ceil(o.grace_period * o.reduction_factor), o.max_epochs)}"
                if search.first and asha else ""))
          + f"), {o.num_samples} trials, "
          + (f"{o.folds}-fold cross-validation of train+val ({pool} images) in every trial, " if o.folds > 1
             else f"one validation split ({len(data.indices('val'))} images), ")
          + f"profile {search.profile}, {o.image_size}px, max {o.max_epochs} epochs, "
          + (f"ASHA grace {o.grace_period}, " if asha else "FIFO (no early stopping), ")
          + f"{search.slots} at once, {resources} per trial, "
          f"sampler {o.sampler}, metric {o.metric}" + (f", time budget {o.time_budget:.0f}s" if o.time_budget else "")
          + (f", stop rule: the best within its validation error of the metric's ceiling, or {patience} proposed "
             f"trials in a row that do not beat it by more than that" if (patience := _stop_patience(search)) else
             ", no stop rule" + (" (the loss of one validation split has no standard error: use --folds or another "
                                 "--metric)" if o.stop_rule and not space.fixed else "")),
          flush=True)


def _after_fit(search: Search, searcher, *, fit_seconds: float, interrupted: bool = False) -> tuple[bool, dict]:
    """optuna_trials.csv, the progress plot and the summary; says what to do about unfinished
    trials. Returns whether the search ended (every trial run, its time budget or the stop rule ended
    it), and the stop rule's record."""
    o, folder = search.options, search.folder
    remove_torn(folder)
    searcher.restore_from_dir(str(folder))  # the state Ray saved last
    searcher.searcher.write_study()
    trials = searcher.searcher.study.trials_dataframe()
    write_atomic(folder / "optuna_trials.csv", lambda p: trials.to_csv(p, index=False))
    board = pd.read_csv(folder / "leaderboard.csv")
    plot_progress(board, folder / "search_progress.png", metric=o.metric, mode=METRIC_MODES[o.metric],
                  name=folder.name)
    print_summary(board, folder, metric=o.metric)
    stop = stop_record(searcher.searcher.stop_rule, metric=o.metric, num_samples=o.num_samples, trials=len(board),
                       fit_seconds=fit_seconds, time_budget=o.time_budget)
    unfinished = o.num_samples - int(board["status"].isin(["TERMINATED", "ERROR"]).sum())
    if interrupted:
        return False, stop
    if stop.get("stopped"):
        cut = int((board["status"] == "INTERRUPTED").sum())
        print(f"stop rule: the search ended after {stop['trials_run']} of {o.num_samples} trials, in {fit_seconds:.0f}s"
              + (f" of its {o.time_budget:.0f}s budget ({stop['budget_unspent_seconds']:.0f}s unspent)"
                 if o.time_budget else "") + f": {stop['reason']}"
              + (f"; {cut} running trial(s) stopped where they were (INTERRUPTED: finalize goes on from their "
                 f"checkpoints when they rank among the best)" if cut else ""), flush=True)
        return True, stop
    if unfinished <= 0:
        return True, stop
    if o.time_budget and fit_seconds >= o.time_budget:
        print(f"the time budget of {o.time_budget:.0f}s ended the search with {unfinished} trial(s) not run or "
              f"unfinished; continue them with {_resume_command(folder)} --time-budget <seconds>")
        return True, stop
    print(f"the search stopped with {unfinished} trial(s) unfinished; continue it with {_resume_command(folder)}, "
          f"or finalize what it found with python -m search.finalize --experiment {folder}")
    return False, stop


def _resume_command(folder: Path) -> str:
    return f"python -m search.run --resume --name {folder.name} --storage {folder.parent}"
