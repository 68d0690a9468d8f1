"""The final model of a search: retrain its best configurations, ensemble them, evaluate on the
test split that the search never saw, and write `<experiment>/final/`.

Example:
    >>> final = finalize(FinalizeOptions(experiment="experiments/backbones-20261123-0100", seeds=3))
    >>> json.loads((final / "metrics.json").read_text())["chosen"]
    'ensemble-fitted'
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from core.formatting import figure
from core.errors import UserError
from search.engine.checkpoints import torn
from search.engine.cluster import check_fits, connected
from search.data.search_data import audited, load_search_data
from search.final.ensemble import calibrate, choose, score_models
from search.outputs.evaluate import positive_class
from search.data.external_sets import External, check_externals, like, load_externals
from search.options import FinalizeOptions, check_fields
from search.outputs.records import read_search_record, versions, write_json
from search.final.readouts import Finalized, predictions_table
from search.final.report import computed, render_report
from search.final.retrain import candidates, retrain_top
from search.final.strata import strata_figures
from search.final.saved_model import save_model
from search.engine.tracking import log_outputs
from ingest.dataset import Dataset


def finalize(options: FinalizeOptions, *, data: Dataset | None = None, externals: list[External] | None = None) -> Path:
    """Retrain, ensemble, evaluate and report; returns `<experiment>/final`.

    `data` is the search's loaded Dataset when called from `search.engine.experiment` (else it is loaded
    again and checked against the search's fingerprint); `externals` its `--external` sets, loaded
    (else loaded here, before any retraining).

    Raises:
        UserError: not an experiment, no trial that reported, data changed, bad options.
    """
    check_fields(options)
    folder = Path(options.experiment).expanduser().resolve()
    record = read_search_record(folder)
    search = record["options"]
    metric = search["metric"]
    board = read_leaderboard(folder, metric)
    if data is None:
        data = _search_data(record, options.data)
    positive = positive_class(data.class_names, options.positive_class)
    if externals is None:
        check_externals(options.external, options.class_map)
        externals = load_externals(options.external, options.class_map, **like(data),
                                   ct_window=search.get("ct_window", "lung"), skip_corrupt=search.get("skip_corrupt", False))
    found = candidates(folder, board, metric=metric, epochs=options.epochs, warm_restart=options.warm_restart)
    n_folds = int(search.get("folds") or 1)
    if n_folds > 1 and options.refit_on_val:
        raise UserError(f"--refit-on-val does not apply to this cross-validated search: its members are the "
                        f"{n_folds} fold models of each configuration, which together saw all of train+val")
    folds = data.cv_folds(n_folds, search["seed"]) if n_folds > 1 else None
    selection = np.sort(np.concatenate([held_out for _, held_out in folds])) if folds else data.indices("val")
    where = f"out-of-fold predictions of train+val ({n_folds} folds)" if folds else "validation"
    cpus = options.cpus_per_model or search.get("cpus_per_trial") or 1
    gpus = options.gpus_per_model if options.gpus_per_model is not None else (search.get("gpus_per_trial") or 0)
    with connected(options.address):
        check_fits(cpus, gpus, task="retrain a model", flags="--cpus-per-model / --gpus-per-model",
                   cluster=bool(options.address))
        print(f"finalize: retraining {min(options.top_k, len(found))} configuration(s) x {options.seeds} seed(s)"
              f"{f' x {n_folds} folds of train+val' if folds else ' on train+val' if options.refit_on_val else ' on train'}"
              f" ({options.epochs} epochs; a warm restart for {options.warm_restart}), {cpus:g} CPU / {gpus:g} GPU each",
              flush=True)
        members, failed = retrain_top(found, options.top_k, data, seeds=options.seeds, folds=folds,
                                      refit_on_val=options.refit_on_val, cpus=cpus, gpus=gpus, fold_seed=search["seed"],
                                      share_idle_cores=search.get("share_idle_cores", True))
    models = score_models(members, data, selection=selection, positive=positive, metric=metric,
                          resamples=options.bootstrap)
    chosen, choice, margin = choose(models, data, selection, metric, resamples=options.bootstrap, where=where)
    models[chosen] = calibrate(models[chosen], data, selection=selection, positive=positive, resamples=options.bootstrap)
    strata = strata_figures(data, models[chosen], positive=positive, resamples=options.bootstrap)
    summary = {"experiment": folder.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "finalize_options": asdict(options), "search": {k: record.get(k) for k in ("space", "profile", "options")},
               "warm_start": record.get("warm_start"), "stop_rule": _stop_rule(folder),
               "data": data.summary(), "versions": versions(), "positive_class": data.class_names[positive],
               "selection": {"mode": "cross-validation" if folds else "validation split", "folds": n_folds,
                             "images": int(len(selection)), "where": where},
               "audit": _audit_summary(folder, search),
               "chosen": chosen, "choice": choice, "choice_margin": margin, "failed_members": failed, "strata": strata,
               "models": {n: {k: v for k, v in m.items() if not k.endswith("_probs")} for n, m in models.items()}}
    final = write_final(folder, summary=summary, models=models, members=members, board=board, data=data,
                        selection=selection, externals=externals)
    if options.keep_checkpoints == "used":
        remove_unused_checkpoints(folder, board, keep={m["trial_id"] for m in members})
    if search.get("mlflow") is not None:
        log_outputs(folder, search["mlflow"], [("final", f) for f in sorted(final.iterdir()) if f.is_file()]
                    + [("final/model", final / "ensemble")])
    return final


def _stop_rule(folder: Path) -> dict | None:
    """The stop rule's record of the search (timings.json, written when the search ends), if any."""
    try:
        return json.loads((folder / "timings.json").read_text()).get("stop_rule")
    except (OSError, ValueError):
        return None


def remove_unused_checkpoints(folder: Path, board: pd.DataFrame, *, keep: set[str]) -> None:
    """Remove the checkpoints of the trials that ended (finished or stopped) and are not in `keep`:
    neither a member nor --resume needs them (a failed trial keeps its own: --resume retries it from
    there); and in every trial the torn folders Ray never registered (`search.engine.checkpoints.torn`),
    which nothing reads. A search's checkpoints hold the optimizer's state too (ResNet50: 270 MB a
    trial, one per fold when cross-validated)."""
    ended = set(board.loc[board["status"] == "TERMINATED", "trial_id"].astype(str)) - keep
    freed, trials, cut = 0, 0, 0
    for trial in sorted(folder.glob("trial_*")):
        unused = torn(trial)
        cut += len(unused)
        if trial.name[len("trial_"):] in ended:
            unused = [c for c in trial.glob("checkpoint_*") if c.is_dir()]
            trials += bool(unused)
        freed += sum(f.stat().st_size for c in unused for f in c.rglob("*") if f.is_file())
        for c in unused:
            shutil.rmtree(c)
    if trials or cut:
        print(f"removed the checkpoints of {trials} trial(s) no member came from"
              + (f" and {cut} torn checkpoint folder(s) Ray never registered" if cut else "")
              + f" ({freed / 1e6:,.0f} MB); --keep-checkpoints all keeps them", flush=True)


def read_leaderboard(folder: Path, metric: str) -> pd.DataFrame:
    """The search's leaderboard, with at least one trial that reported `metric`.

    Raises:
        UserError: no trial has reported yet.
    """
    path = folder / "leaderboard.csv"
    board = pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()
    if board.empty or metric not in board or board[metric].notna().sum() == 0:
        raise UserError(f"no trial of {folder.name} has reported {metric} yet: nothing to finalize "
                        f"(continue the search with --resume, or wait for a trial to finish an epoch)")
    return board


def _audit_summary(folder: Path, search: dict) -> dict:
    """The warnings the data audit raised before the search, and what was done about the leaks."""
    path = folder / "data_report.json"
    audit = json.loads(path.read_text()) if path.is_file() else {}
    return {"warnings": audit.get("warnings", []), "deduped": audit.get("deduped"), "dedupe": search.get("dedupe"),
            "probe": audit.get("probe")}


def _search_data(record: dict, moved_to: str | None) -> Dataset:
    o = record["options"]
    path = moved_to or o["data"]
    if not path:
        raise UserError("the search's data path is not recorded; pass --data")
    if not Path(path).expanduser().exists():
        raise UserError(f"the search's data {path!r} is not there any more; pass --data with where it is now")
    data = load_search_data(Path(path).expanduser(), image_size=o["image_size"], channels=o["channels"],
                            seed=o["seed"], group_column=o.get("group_column"),
                            skip_corrupt=o.get("skip_corrupt", False), subset=o.get("subset"),
                            fingerprint=record["data"]["fingerprint"], ct_window=o.get("ct_window", "lung"),
                            store=record["data"].get("store", {}).get("store", "memory"), cache=o.get("data_cache"),
                            strata_columns=tuple(o.get("strata") or ()))
    return audited(data, dedupe=True)[0] if o.get("dedupe") else data


def write_final(folder: Path, *, summary: dict, models: dict, members: list[dict], board: pd.DataFrame,
                data: Dataset, selection: np.ndarray, externals: list[External] = ()) -> Path:
    """`folder/final/`, built in a temporary folder and renamed into place; an older `final/` is
    kept as `final-<date>-<time>/`."""
    final, tmp = folder / "final", folder / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_into(tmp, folder, summary=summary, models=models, members=members, board=board, data=data,
                    selection=selection, externals=externals)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        kept = folder / f"final-{time.strftime('%Y%m%d-%H%M%S', time.localtime(final.stat().st_mtime))}"
        final.rename(kept)
        print(f"the previous final/ is kept as {kept.name}/")
    tmp.rename(final)
    _print_summary(final, summary)
    return final


def _write_into(tmp: Path, folder: Path, *, summary: dict, models: dict, members: list[dict], board: pd.DataFrame,
                data: Dataset, selection: np.ndarray, externals: list[External]) -> None:
    """The final model, and what the report's sections compute (`search.final.report.SECTIONS`), before
    metrics.json, the predictions tables and the report."""
    chosen, positive = summary["chosen"], data.class_names.index(summary["positive_class"])
    _save_models(tmp, folder, summary, models, members, data)
    summary.update(computed(Finalized(tmp=tmp, folder=folder, summary=summary, models=models, board=board, data=data,
                                      externals=externals, positive=positive, members=members)))
    write_json(tmp / "metrics.json", summary)
    for split, idx in (("val", selection), ("test", data.indices("test"))):
        predictions_table(data, split, idx, models[chosen]).to_csv(tmp / f"{split}_predictions.csv", index=False)
    (tmp / "report.md").write_text(render_report(folder, summary, models, board, _siblings(folder, summary)))


def _save_models(tmp: Path, folder: Path, summary: dict, models: dict, members: list[dict], data: Dataset) -> None:
    """`members/<name>/` for each member alone, and `ensemble/`: the final model."""
    record = {"class_names": data.class_names, "positive_class": summary["positive_class"],
              "preprocessing": {"image_size": int(data.images.shape[1]), "channels": int(data.channels),
                                "ct_window": summary["search"]["options"].get("ct_window", "lung"),
                                "decode": "ingest.image_file.decode_image"},
              "data": summary["data"], "versions": summary["versions"], "experiment": str(folder)}
    by_name = {m["name"]: m for m in members}

    def saved(name, weight):
        member = by_name[name]
        return {"name": name, "trial_id": member["trial_id"], "config": member["config"], "weight": float(weight),
                "states": [state for r in member["runs"] for state in r["states"]]}

    def decision(name):  # what turns its networks' outputs into the saved model's probabilities and labels
        return {"name": name, "threshold": models[name]["val"]["threshold"],
                "temperature": models[name].get("temperature", 1.0)}

    for name in by_name:
        save_model(tmp / "members" / name, {**record, "kind": "single", **decision(name)}, [saved(name, 1.0)])
    chosen = summary["chosen"]
    weights = models[chosen]["weights"] if models[chosen]["kind"] == "ensemble" else {chosen: 1.0}
    save_model(tmp / "ensemble", {**record, "kind": "ensemble" if len(weights) > 1 else "single", **decision(chosen)},
               [saved(n, w) for n, w in weights.items() if w > 0])


def _siblings(folder: Path, summary: dict) -> list[dict]:
    """The chosen models of other finalized searches on the same data (e.g. `--space recipes`)."""
    rows = []
    for other in sorted(folder.parent.iterdir()):
        path = other / "final" / "metrics.json"
        if other == folder or not path.is_file():
            continue
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            continue
        try:
            if theirs.get("data", {}).get("fingerprint") != summary["data"]["fingerprint"]:
                continue
            test = theirs["models"][theirs["chosen"]]["test"]
            row = {"experiment": other.name, "space": theirs["search"].get("space"), "model": theirs["chosen"],
                   "test": {k: test[k] for k in ("auc", "ci", "accuracy", "sensitivity", "specificity")}}
            row["test"]["ci"]["auc"]
        except (AttributeError, KeyError, TypeError):  # written by another version: not comparable here
            warnings.warn(f"left {other.name} out of the comparison with other searches: its final/metrics.json "
                          f"lacks what this version reports", stacklevel=2)
            continue
        rows.append(row)
    return rows


def _print_summary(final: Path, summary: dict) -> None:
    metric = summary["search"]["options"]["metric"][4:]
    print(f"\nfinal: {final}")
    for name, m in summary["models"].items():
        t = m["test"]
        mark = "*" if name == summary["chosen"] else " "
        print(f" {mark} {name:40s} test AUC {t['auc']:.4f} [{t['ci']['auc'][0]:.3f}, {t['ci']['auc'][1]:.3f}]  "
              f"acc {t['accuracy']:.3f}  sens {figure(t['sensitivity'])}  spec {figure(t['specificity'])}  "
              f"(validation {metric} {m['val'][metric]:.4f})")
    for e in summary.get("external") or []:
        print(f"   external {e['name']:31s} AUC {e['auc']:.4f} [{e['ci']['auc'][0]:.3f}, {e['ci']['auc'][1]:.3f}]  "
              f"acc {e['accuracy']:.3f}  sens {figure(e['sensitivity'])}  spec {figure(e['specificity'])}  "
              f"({e['images']} images; the internal test's threshold)")
    print(f"chosen: {summary['chosen']}: {summary['choice']}")
    print(f"report: {final / 'report.md'}; model: {final / 'ensemble'}")
