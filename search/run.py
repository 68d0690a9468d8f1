"""Run a hyperparameter search: Ray Tune + Optuna + ASHA over a named space.

    python -m search.run --space backbones --data ../shared/data/pneumoniamnist/pneumoniamnist.npz
    python -m search.run --space recipes --data path/to/images --weights random
    python -m search.run --space backbones --data /mnt/shared/data/images --address auto --profile gpu \\
        --storage /mnt/shared/experiments

Writes `<storage>/<name>/`: Ray Tune's results, `leaderboard.csv` and
`leaderboard_by_backbone.csv` (rewritten as trials end), `optuna_trials.csv`,
`search_progress.png` and `search_config.json` (options, versions, data fingerprint); then, unless
`--no-finalize`, `final/` (see search/finalize.py): the retrained top-k, the ensemble, the report.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from trainables import UserError

PROFILES = {
    # a laptop-class CPU: few epochs, two trials at a time on two cores; images at 32 px when they
    # are MedMNIST-sized, else at 64 px (see trainables.data.auto_image_size)
    "cpu": dict(image_size="auto", max_epochs=8, grace_period=1, num_samples=24, batch_size=64,
                cpus_per_trial=1, gpus_per_trial=0, time_budget=900),
    # GPU workers: ImageNet resolution and a longer search
    "gpu": dict(image_size=224, max_epochs=30, grace_period=3, num_samples=64, batch_size=64,
                cpus_per_trial=4, gpus_per_trial=1, time_budget=None),
}
METRICS = {"val_auc": "max", "val_acc": "max", "val_f1": "max", "val_loss": "min"}
SCHEDULERS = ("asha", "fifo")
DATA_ENV = "SEARCH_DATA"


@dataclass
class SearchOptions:
    """Every option of a search, as plain data (recorded in search_config.json).

    None means: take the profile's value.
    """

    space: str = "backbones"
    data: str | None = None
    profile: str = "auto"
    num_samples: int | None = None
    max_epochs: int | None = None
    grace_period: int | None = None
    reduction_factor: float = 3
    scheduler: str = "asha"
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    address: str | None = None
    storage: str = "experiments"
    name: str | None = None
    resume: bool = False
    time_budget: float | None = None
    seed: int = 0
    metric: str = "val_auc"
    sampler: str = "tpe"
    backbones: str | None = None
    recipes: str | None = None
    weights: str = "imagenet"
    weights_dir: str | None = None
    image_size: int | str | None = None
    channels: int = 1
    batch_size: int | None = None
    group_column: str | None = None
    skip_corrupt: bool = False
    dedupe: bool = False
    subset: int | None = None
    max_retries: int = 2
    finalize: bool = True
    top_k: int = 3
    seeds: int = 1
    refit_on_val: bool = False
    positive_class: str | None = None


FINALIZE_OPTIONS = ("finalize", "top_k", "seeds", "refit_on_val", "positive_class")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from spaces import list_spaces
    p.add_argument("--space", default="backbones", help=f"search space: {', '.join(list_spaces())}")
    p.add_argument("--data", help=f"image folder, MedMNIST-style .npz or CSV manifest (default: ${DATA_ENV})")
    p.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                   help="defaults for size, epochs and trials; auto: gpu when the cluster has GPUs")
    p.add_argument("--num-samples", type=int, help="trials to run (profile: cpu 24, gpu 64)")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped (cpu 8, gpu 30)")
    p.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (cpu 1, gpu 3)")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA keeps 1/this of trials per rung")
    p.add_argument("--scheduler", default="asha",
                   help="asha: stop weak trials early; fifo: run every trial to --max-epochs")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (cpu 1, gpu 4)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (gpu 1)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument("--address", help="join a running Ray cluster: auto, or the head's host:6379")
    p.add_argument("--storage", default="experiments", help="experiment root (a path every node reaches)")
    p.add_argument("--name", help="experiment name (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the experiment --name in --storage")
    p.add_argument("--time-budget", type=float, help="stop the search after this many seconds (cpu 900)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the sampler and the trials")
    p.add_argument("--metric", default="val_auc", choices=list(METRICS), help="validation metric to optimise")
    p.add_argument("--sampler", default="tpe", help="Optuna sampler: tpe, random, qmc, gp")
    p.add_argument("--backbones", help="comma-separated timm names replacing the space's backbones")
    p.add_argument("--recipes", help="comma-separated recipe names: run only these of --space recipes")
    p.add_argument("--weights", default="imagenet", choices=["imagenet", "random"],
                   help="ImageNet weights (local --weights-dir, installed package, or timm's hub), "
                        "or random initialisation")
    p.add_argument("--weights-dir", help="folder of local checkpoints named <backbone>.pth or .safetensors")
    p.add_argument("--image-size", type=int,
                   help="side of the decoded images (cpu: 32 for images up to 48 px, else 64; gpu 224)")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3], help="1 grayscale, 3 RGB")
    p.add_argument("--batch-size", type=int, help="training batch size (64)")
    p.add_argument("--group-column", help="manifest column of patient ids (detected by name when obvious)")
    p.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out, with a warning")
    p.add_argument("--dedupe", action="store_true",
                   help="drop train/val copies of files that also appear in a later split (the audit names them)")
    p.add_argument("--subset", type=int, help="at most this many images per split (smoke runs)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a trial whose worker fails")
    p.add_argument("--no-finalize", dest="finalize", action="store_false",
                   help="stop after the search: no retraining, ensemble or report (python -m search.finalize)")
    from search.finalize import add_finalize_flags
    add_finalize_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = SearchOptions(**{f.name: getattr(args, f.name) for f in fields(SearchOptions)})
    try:
        run_search(options)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with --resume --name <name>", file=sys.stderr)
        return 130
    return 0


def run_search(options: SearchOptions) -> Path:
    """Run (or resume) a search and return its experiment folder.

    Example:
        >>> run_search(SearchOptions(space="tiny", data="pneumoniamnist.npz", num_samples=4))

    Raises:
        UserError: bad options, data, weights or resources; nothing is written before the checks.
    """
    import pandas as pd
    import ray

    from search.evaluate import positive_class
    from search.finalize import FinalizeOptions, finalize
    from search.leaderboard import LeaderboardCallback, plot_progress, print_summary, write_atomic
    from search.tuner import bind_space, make_scheduler, make_searcher, make_tuner, with_data
    from spaces import get_space
    from trainables.audit import render as render_audit
    from trainables.data import load_dataset
    from trainables.models import num_stages, weights_source
    from trainables.train import train_classifier

    clock = {"started": time.time()}
    storage = Path(options.storage).expanduser().resolve()
    saved = None
    if options.resume:
        if not options.name:
            raise UserError("--resume needs --name: the experiment to continue")
        saved = _saved_search(storage / options.name)
        # a resumed search runs with the options it started with; only where it runs, and what
        # happens after it, may change
        options = SearchOptions(**{**saved["options"], "resume": True, "address": options.address,
                                   "storage": options.storage,
                                   **{k: getattr(options, k) for k in FINALIZE_OPTIONS}})
    space = get_space(options.space)
    if options.recipes:
        space = _only_recipes(space, options.recipes)
    _check_options(options)
    data_path = _data_path(options.data)
    name = options.name or f"{options.space}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = storage / name
    if folder.exists() and not options.resume:
        raise UserError(f"experiment {folder} already exists; pass --resume to continue it or choose "
                        f"another --name")

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the progress lines below replace Ray's tables
    # a failed trial gets one line from the leaderboard callback; its trace stays in its folder
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")
    try:
        cluster = ray.cluster_resources()
        profile = options.profile if options.profile != "auto" else ("gpu" if cluster.get("GPU") else "cpu")
        o = SearchOptions(**{**asdict(options), **{k: v for k, v in PROFILES[profile].items()
                                                   if getattr(options, k) is None}})
        if o.name is None:
            o.name = name
        o.data = str(data_path.resolve())  # recorded absolute: finalize and --resume find it from anywhere
        _check_resources(o)

        data = load_dataset(data_path, image_size=o.image_size, channels=o.channels, seed=o.seed,
                            group_column=o.group_column, skip_corrupt=o.skip_corrupt, subset=o.subset)
        o.image_size = int(data.images.shape[1])  # "auto" resolved, recorded for finalize and --resume
        if saved and saved["data"]["fingerprint"] != data.fingerprint:
            raise UserError(f"the data at {data_path} changed since the search started (fingerprint "
                            f"{saved['data']['fingerprint']}, now {data.fingerprint}); start a new search")
        positive_class(data.class_names, o.positive_class)  # a bad --positive-class fails now
        data, audit = audited(data, dedupe=o.dedupe)
        backbones = _backbones(space, o, profile)
        stages = {b: num_stages(b) for b in backbones}
        configs = _fixed_configs(space, o, backbones, stages, data.num_classes)
        for backbone in sorted({c["backbone"] for c in configs if c["weights"] == "imagenet"}):
            weights_source(backbone, "imagenet", o.weights_dir)  # fails now, not in every trial

        metric, mode = o.metric, METRICS[o.metric]
        num_samples = o.num_samples if not space.fixed or options.num_samples else len(space.points)
        slots = (cluster.get("GPU", 0) / o.gpus_per_trial if o.gpus_per_trial
                 else cluster.get("CPU", 1) / o.cpus_per_trial)
        max_concurrent = o.max_concurrent or max(1, int(slots))
        searcher = make_searcher(
            bind_space(space, backbones=backbones, stages=stages, pretrained=o.weights == "imagenet"),
            metric=metric, mode=mode, sampler=o.sampler, seed=o.seed, max_epochs=o.max_epochs,
            max_concurrent=max_concurrent, points=list(space.points))
        scheduler = make_scheduler(metric=metric, mode=mode, max_epochs=o.max_epochs,
                                   grace_period=o.grace_period,
                                   reduction_factor=o.reduction_factor) if o.scheduler == "asha" else None
        callback = LeaderboardCallback(folder, metric=metric, mode=mode, num_samples=num_samples,
                                       time_budget=o.time_budget, scheduler=scheduler)
        base_config = {"image_size": o.image_size, "batch_size": o.batch_size, "max_epochs": o.max_epochs,
                       "seed": o.seed, "weights": o.weights, "weights_dir": o.weights_dir}
        resources = {"cpu": o.cpus_per_trial, "gpu": o.gpus_per_trial}

        print(f"experiment: {folder}")
        print(f"data: {data.source} | classes {data.class_names} | "
              f"{ {s: sum(c.values()) for s, c in data.counts().items()} } | split {data.split_kind} | "
              f"fingerprint {data.fingerprint}")
        print(f"search: space {space.name} ("
              + (f"{len(space.points)} fixed point(s)" if space.fixed else f"{len(backbones)} backbones")
              + f"), {num_samples} trials, profile "
              f"{profile}, {o.image_size}px, max {o.max_epochs} epochs, "
              + (f"ASHA grace {o.grace_period}, " if scheduler else "FIFO (no early stopping), ") +
              f"{max_concurrent} at once, {resources} per trial, sampler {o.sampler}, metric {metric}"
              + (f", time budget {o.time_budget:.0f}s" if o.time_budget else ""), flush=True)

        trainable = with_data(train_classifier, data, resources)
        if options.resume:
            from ray import tune
            tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_errored=True)
        else:
            folder.mkdir(parents=True)
            record = {"options": asdict(o), "profile": profile, "space": space.name, "backbones": list(backbones),
                      "data": data.summary(), "versions": _versions(), "command": sys.argv,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cluster": cluster}
            write_atomic(folder / "search_config.json",
                         lambda p: p.write_text(json.dumps(record, indent=2, default=str)))
            tuner = make_tuner(trainable, searcher=searcher, scheduler=scheduler, num_samples=num_samples,
                               time_budget=o.time_budget, storage=str(storage), name=name,
                               base_config=base_config, callbacks=[callback], max_retries=o.max_retries)
        write_atomic(folder / "data_report.json", lambda p: p.write_text(json.dumps(audit, indent=2)))
        write_atomic(folder / "data_report.md", lambda p: p.write_text(render_audit(audit)))
        clock["fit_started"] = time.time()
        tuner.fit()
        clock["fit_ended"] = time.time()
        budget_spent = bool(o.time_budget) and clock["fit_ended"] - clock["fit_started"] >= o.time_budget
        _write_optuna_trials(searcher, folder, write_atomic)
        board = pd.read_csv(folder / "leaderboard.csv")
        plot_progress(board, folder / "search_progress.png", metric=metric, mode=mode, name=name)
        print_summary(board, folder, metric=metric)
        unfinished = num_samples - int(board["status"].isin(["TERMINATED", "ERROR"]).sum())
        if unfinished > 0 and budget_spent:
            print(f"the time budget of {o.time_budget:.0f}s ended the search with {unfinished} trial(s) "
                  f"not run or unfinished")
        elif unfinished > 0:
            print(f"the search stopped with {unfinished} trial(s) unfinished; continue it with "
                  f"python -m search.run --resume --name {name} --storage {options.storage}, or finalize "
                  f"what it found with python -m search.finalize --experiment {folder}")
            _write_timings(folder, clock, slots=max_concurrent, write_atomic=write_atomic)
            return folder
        clock["search_ended"] = time.time()
        if o.finalize:
            finalize(FinalizeOptions(experiment=str(folder), top_k=o.top_k, seeds=o.seeds, address=o.address,
                                     refit_on_val=o.refit_on_val, positive_class=o.positive_class), data=data)
        _write_timings(folder, clock, slots=max_concurrent, write_atomic=write_atomic)
        return folder
    finally:
        ray.shutdown()


def audited(data, *, dedupe: bool):
    """The data audit, printed; with `dedupe` the leaking copies dropped (and named)."""
    from trainables.audit import audit_dataset, dedupe as drop_duplicates, summary_lines
    report = audit_dataset(data)
    print("\n".join(summary_lines(report)), flush=True)
    if dedupe:
        data, dropped = drop_duplicates(data, report)
        report["deduped"] = dropped
        report["counts_after_dedupe"] = data.counts()
        print(f"  --dedupe: dropped {len(dropped)} copies: {'; '.join(dropped) or 'none'}", flush=True)
    return data, report


# ---- checks at the boundary -------------------------------------------------------------------

def _check_options(o: SearchOptions) -> None:
    positive = {"num_samples": o.num_samples, "max_epochs": o.max_epochs, "grace_period": o.grace_period,
                "cpus_per_trial": o.cpus_per_trial, "max_concurrent": o.max_concurrent,
                "time_budget": o.time_budget, "batch_size": o.batch_size,
                "subset": o.subset}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {value}")
    if o.image_size not in (None, "auto") and not (isinstance(o.image_size, int) and o.image_size > 0):
        raise UserError(f"--image-size must be a positive number of pixels or 'auto', got {o.image_size!r}")
    if o.gpus_per_trial is not None and o.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {o.gpus_per_trial}")
    if o.gpus_per_trial and o.gpus_per_trial > 1 and o.gpus_per_trial != int(o.gpus_per_trial):
        raise UserError(f"--gpus-per-trial above 1 must be a whole number, got {o.gpus_per_trial}")
    if o.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {o.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if o.reduction_factor < 2:
        raise UserError(f"--reduction-factor must be >= 2, got {o.reduction_factor}")
    for key in ("top_k", "seeds"):
        if getattr(o, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(o, key)}")
    if o.max_retries < 0:
        raise UserError(f"--max-retries must be >= 0, got {o.max_retries}")
    if o.grace_period and o.max_epochs and o.grace_period > o.max_epochs:
        raise UserError(f"--grace-period {o.grace_period} exceeds --max-epochs {o.max_epochs}")
    if o.weights_dir and not Path(o.weights_dir).expanduser().is_dir():
        raise UserError(f"--weights-dir {o.weights_dir!r} is not a folder")
    from search.tuner import SAMPLERS
    if o.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {o.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if o.backbones:
        import timm
        unknown = [b for b in o.backbones.split(",") if b.strip() and not timm.is_model(b.strip())]
        if unknown:
            raise UserError(f"unknown backbone(s) {unknown}; use timm model names (timm.list_models())")


def _saved_search(folder: Path) -> dict:
    path = folder / "search_config.json"
    if not path.exists():
        raise UserError(f"nothing to resume at {folder}: no search_config.json there")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _data_path(given: str | None) -> Path:
    path = given or os.environ.get(DATA_ENV)
    if not path:
        medmnist = Path(os.environ.get("MEDMNIST_ROOT", "~/.medmnist")).expanduser() / "pneumoniamnist.npz"
        if medmnist.exists():
            return medmnist
        raise UserError(f"no data given: pass --data (an image folder, .npz or .csv manifest) or set "
                        f"{DATA_ENV}; looked for the MedMNIST default at {medmnist} too")
    if not Path(path).expanduser().exists():
        raise UserError(f"data path {path!r} does not exist")
    return Path(path).expanduser()


def _check_resources(o: SearchOptions) -> None:
    """On this machine a trial no node can hold is an error; on a cluster (--address) it is a
    warning, since the autoscaler adds nodes for trials that wait."""
    import ray
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= o.cpus_per_trial and r.get("GPU", 0) >= (o.gpus_per_trial or 0) for r in nodes):
        have = "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}" for r in nodes)
        need = f"{o.cpus_per_trial:g} CPU and {o.gpus_per_trial or 0:g} GPU"
        if o.address:
            print(f"warning: no node can run a trial with {need} yet (nodes: {have}); trials wait until the "
                  f"autoscaler adds one", flush=True)
            return
        raise UserError(f"no node can run a trial with {need} (nodes: {have}); lower --cpus-per-trial / "
                        f"--gpus-per-trial or add nodes")


def _backbones(space, o: SearchOptions, profile: str) -> tuple[str, ...]:
    if o.backbones:
        chosen = tuple(b.strip() for b in o.backbones.split(",") if b.strip())
        if space.fixed:
            raise UserError(f"--backbones does not apply to the fixed space {space.name!r}")
        return chosen
    return space.cpu_backbones if profile == "cpu" and space.cpu_backbones else space.backbones


def _only_recipes(space, names: str):
    import dataclasses
    known = [p.get("recipe") for p in space.points]
    if not space.fixed or not all(known):
        raise UserError(f"--recipes applies to --space recipes, not {space.name!r}")
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise UserError(f"unknown recipe(s) {unknown or names!r}; recipes: {', '.join(known)}")
    return dataclasses.replace(space, points=tuple(p for p in space.points if p["recipe"] in wanted))


def _fixed_configs(space, o: SearchOptions, backbones, stages, num_classes: int) -> list[dict]:
    """Configs drawn before the search and validated now: each recipe, or one per backbone (so a
    bad backbone, or one whose weights cannot be reached, fails here and not in every trial)."""
    import optuna

    from trainables.config import validate_config
    base = {"weights": o.weights, "image_size": o.image_size, "batch_size": o.batch_size,
            "max_epochs": o.max_epochs}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=o.seed))
    configs = []
    for point in space.points or [{"backbone": b} for b in backbones]:
        study.enqueue_trial(point)
        drawn = space.sample(study.ask(), backbones=backbones, stages=stages, pretrained=o.weights == "imagenet")
        configs.append(validate_config({**base, **drawn}, num_classes=num_classes))
    return configs


# ---- outputs ----------------------------------------------------------------------------------

def _versions() -> dict:
    import optuna
    import ray
    import sklearn
    import timm
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "ray": ray.__version__, "optuna": optuna.__version__, "scikit-learn": sklearn.__version__,
            "platform": platform.platform(), "cuda": torch.version.cuda}


def _write_timings(folder: Path, clock: dict, *, slots: int, write_atomic) -> None:
    """timings.json: where this command's wall time went (bench/overhead.py reads it)."""
    now = time.time()
    search_ended = clock.get("search_ended", now)
    timings = {**clock, "ended": now, "trial_slots": slots,
               "before_fit_seconds": clock["fit_started"] - clock["started"],
               "fit_seconds": clock["fit_ended"] - clock["fit_started"],
               "after_fit_seconds": search_ended - clock["fit_ended"],
               "finalize_seconds": now - search_ended, "search_seconds": search_ended - clock["started"]}
    write_atomic(folder / "timings.json", lambda p: p.write_text(json.dumps(timings, indent=2)))


def _write_optuna_trials(searcher, folder: Path, write_atomic) -> None:
    """optuna_trials.csv from the searcher state Ray saved (a resumed search ran a restored copy)."""
    searcher.restore_from_dir(str(folder))
    frame = searcher.searcher.study.trials_dataframe()
    write_atomic(folder / "optuna_trials.csv", lambda p: frame.to_csv(p, index=False))


if __name__ == "__main__":
    sys.exit(main())
