"""Where people already look at experiments: TensorBoard's HParams tab at each trial's best epoch,
and (with `--mlflow`) one MLflow run per trial under a parent run of the search.

Ray's own callbacks fall short on both: its TensorBoard logger writes HParams against the last
epoch's metrics, and its MLflow callback starts a second run for every trial of a restored search
(ray#48664). Here a trial's run is found again by its `trial_id` tag, and a resumed trial logs only
the epochs its run does not hold yet.

Example:
    >>> callbacks = [BestEpochTensorBoard(metric="val_auc", mode="max"),
    ...              MlflowTracking(folder, uri="experiment", metric="val_auc", scheduler=scheduler)]
    >>> client = MlflowClient(tracking_uri(folder, "experiment"))   # the runs, read back
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from core.choices import METRIC_MODES
from core.errors import UserError
from search.engine import ray_internals as internals
from search.engine.checkpoints import results

IN_EXPERIMENT = "experiment"  # --mlflow given alone: a SQLite store inside the experiment folder
URI_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
# what Ray adds to every result that is not a measurement of the trial
RAY_KEYS = {"timestamp", "pid", "training_iteration", "iterations_since_restore", "time_since_restore",
            "done", "trial_id", "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "node_ip", "hostname",
            "date", "config"}


def _better(a, b, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


def best_result(trial_results: list[dict], metric: str, mode: str) -> dict | None:
    """The result of the epoch the leaderboard ranks a trial by: its best `metric`."""
    best = None
    for r in trial_results:
        value = r.get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value) and _better(value, best and best[metric], mode):
            best = r
    return best


class BestEpochTensorBoard(TBXLoggerCallback):
    """Ray's TensorBoard logger (every epoch's scalars under `ray/tune/`), except that a trial's
    HParams entry holds its best epoch's validation metrics (`best/<metric>`, `best/epoch`), the
    numbers the leaderboard ranks by, over every epoch it ran (before a `--resume` too)."""

    def __init__(self, *, metric: str, mode: str):
        super().__init__()
        self.metric, self.mode = metric, mode

    def log_trial_end(self, trial, failed: bool = False):
        if trial in internals.trial_writers(self):
            best = best_result(results(Path(trial.local_path)), self.metric, self.mode)
            if best is not None:
                internals.skip_last_hparams(self, trial)  # Ray's own hparams (last epoch) are not written
                self._log_best(trial, best)
        super().log_trial_end(trial, failed=failed)

    def _log_best(self, trial, best: dict) -> None:
        from tensorboardX.summary import hparams
        epoch = int(best["training_iteration"])
        metrics = {f"best/{m}": float(best[m]) for m in METRIC_MODES if isinstance(best.get(m), (int, float))}
        metrics["best/epoch"] = float(epoch)
        writer = internals.trial_writers(self)[trial]
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, global_step=epoch)
        params = {k: v for k, v in trial.config.items() if isinstance(v, (str, bool, int, float))}
        for summary in hparams(hparam_dict=params, metric_dict=metrics):
            writer.file_writer.add_summary(summary)
        writer.flush()


def tracking_uri(folder: Path, uri: str) -> str:
    """The MLflow tracking URI of a search: `uri`, or for `experiment` its folder's own SQLite store."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}" if uri == IN_EXPERIMENT else uri


def check_mlflow(uri: str) -> None:
    """`--mlflow`'s value, checked before anything is written: MLflow installed, a known scheme, and
    a server that answers.

    Raises:
        UserError: naming the value and what is allowed, or why the server cannot be used.
    """
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'lung-search[tracking]'") from None
    if uri == IN_EXPERIMENT:
        return
    scheme = re.match(r"^([a-z][a-z0-9+.-]*):", uri)
    if not scheme or scheme.group(1).split("+")[0] not in URI_SCHEMES:
        raise UserError(f"--mlflow {uri!r} is not a tracking URI; give none (a SQLite store in the experiment "
                        f"folder) or one of the schemes {', '.join(URI_SCHEMES)} (for example "
                        f"http://host:5000 or sqlite:////path/mlflow.db)")
    if scheme.group(1) in ("http", "https"):
        with _quiet(), _one_try():
            try:
                _client(uri).search_experiments(max_results=1)
            except Exception as exc:  # requests and MLflow raise many kinds; the message names it
                raise UserError(f"--mlflow {uri}: the tracking server does not answer ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); start it, or give none for a store in the experiment") from None


@contextmanager
def _one_try():
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@contextmanager
def _quiet():
    """MLflow's SQL store prints its schema migrations at INFO; the console keeps the search's lines."""
    loggers = [logging.getLogger(n) for n in ("alembic", "mlflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def search_runs(client, folder: Path, uri: str) -> tuple[str, dict[str, object]]:
    """The MLflow experiment of a search (named as its folder; created with its artifacts in the
    folder when the store is new) and its runs by role: `search` (the parent) and each `trial_id`."""
    artifacts = (folder / "mlflow-artifacts").as_uri()
    experiment = client.get_experiment_by_name(folder.name)
    if experiment is None:
        experiment_id = client.create_experiment(folder.name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
        if uri == IN_EXPERIMENT and experiment.artifact_location != artifacts:
            _moved(folder / "mlflow.db", experiment_id, experiment.artifact_location, artifacts)
    runs = {}
    for run in client.search_runs([experiment_id], max_results=50_000):
        key = run.data.tags.get("trial_id") or run.data.tags.get("role")
        runs.setdefault(key, run)
    return experiment_id, runs


class MlflowTracking(Callback):
    """One MLflow run per trial (its config as parameters, every epoch's measurements with the epoch
    as step; tags `stopped_early` and `stopped_at_epoch` for a trial ASHA stopped), children of a
    parent run named after the experiment. Runs on the driver; a resumed search logs into the same
    runs."""

    def __init__(self, folder: Path, *, uri: str, metric: str, scheduler=None, options: dict | None = None):
        self.folder, self.uri, self.metric = Path(folder), uri, metric
        self.scheduler, self.options = scheduler, options or {}
        self.client = None
        self.run_ids: dict[str, str] = {}
        self.logged_to: dict[str, int] = {}  # per trial: the last epoch its run holds
        self.ended: set[str] = set()  # trials that finished or failed in this run of the search
        self.orphans_checked = False

    def setup(self, **info):
        with _quiet():
            self.client = _client(tracking_uri(self.folder, self.uri))
            self.experiment_id, runs = search_runs(self.client, self.folder, self.uri)
        parent = runs.get("search")
        if parent is None:
            parent = self.client.create_run(self.experiment_id, run_name=self.folder.name, tags={"role": "search"})
            params = {k: v for k, v in self.options.items() if v is not None}
            self.client.log_batch(parent.info.run_id, params=_params(params))
        self.parent_id = parent.info.run_id
        self.client.update_run(self.parent_id, status="RUNNING")
        for key, run in runs.items():
            if key != "search":
                self.run_ids[key] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, self.metric)
                self.logged_to[key] = max((m.step for m in history), default=0)

    def on_step_begin(self, iteration, trials, **info):
        """Once, when a resumed search holds its trials: a run of a trial it does not hold (a driver killed
        between starting a trial and recording it; the resumed search runs that config again under a new
        id) is deleted, tagged `orphaned`, so that each trial keeps one run."""
        if self.orphans_checked:
            return
        self.orphans_checked, held = True, {t.trial_id for t in trials}
        for tid in [t for t in self.run_ids if t not in held]:
            self.client.set_tag(self.run_ids[tid], "orphaned", "true")
            self.client.delete_run(self.run_ids.pop(tid))

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        if tid in self.run_ids:
            self.client.update_run(self.run_ids[tid], status="RUNNING")
            return
        run = self.client.create_run(self.experiment_id, run_name=tid,
                                     tags={"trial_id": tid, "mlflow.parentRunId": self.parent_id})
        self.run_ids[tid], self.logged_to[tid] = run.info.run_id, 0
        self.client.log_batch(run.info.run_id, params=_params(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric
        tid, epoch = trial.trial_id, int(result.get("training_iteration", 0))
        if tid not in self.run_ids or epoch <= self.logged_to.get(tid, 0):
            return  # an epoch trained again after a resume: its run holds it already
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, epoch) for k, v in result.items()
                   if k not in RAY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self.client.log_batch(self.run_ids[tid], metrics=metrics)
        self.logged_to[tid] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        if tid not in self.run_ids:
            return
        self.ended.add(tid)
        stopped = self.scheduler is not None and tid in getattr(self.scheduler, "stopped", ())
        epochs = (trial.last_result or {}).get("training_iteration", self.logged_to.get(tid, 0))
        self.client.set_tag(self.run_ids[tid], "stopped_early", str(stopped).lower())
        if stopped:
            self.client.set_tag(self.run_ids[tid], "stopped_at_epoch", str(epochs))
        self.client.set_terminated(self.run_ids[tid], status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id in self.run_ids:
            self.ended.add(trial.trial_id)
            self.client.set_terminated(self.run_ids[trial.trial_id], status="FAILED")

    def on_experiment_end(self, trials, **info):
        """Runs of trials the search left unfinished (Ctrl-C, the time budget) end KILLED; `--resume`
        reopens them."""
        for trial in trials:
            run_id = self.run_ids.get(trial.trial_id)
            if run_id and trial.trial_id not in self.ended and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status="KILLED")
        self.client.set_terminated(self.parent_id, status="FINISHED")


def log_outputs(folder: Path, uri: str, outputs: list[tuple[str, Path]]) -> None:
    """Files and folders of the experiment (the leaderboard, the report, the final model) as artifacts
    of the search's parent run: each `(artifact folder, path)`; a path not there is left out. They are
    written already: where MLflow cannot take them (not installed here, its server gone), one warning
    says so and the command goes on."""
    try:
        _log_outputs(folder, uri, outputs)
    except Exception as exc:  # ImportError, requests' and MLflow's errors: the files stay where they are
        warnings.warn(f"MLflow ({uri}) did not take {', '.join(sorted({a for a, _ in outputs}))}/ "
                      f"({type(exc).__name__}: {str(exc)[:160]}); the files are in {folder}", stacklevel=2)


def _log_outputs(folder: Path, uri: str, outputs: list[tuple[str, Path]]) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    with _quiet():
        client = _client(tracking_uri(folder, uri))
        _, runs = search_runs(client, folder, uri)
    parent = runs.get("search")
    if parent is None:
        return
    # the run's artifact location as the store holds it now (MlflowClient keeps the first it saw of a
    # run for the life of the process: a copied experiment's would be the original's)
    repository = get_artifact_repository(parent.info.artifact_uri, tracking_uri=tracking_uri(folder, uri))
    for artifact_path, path in outputs:
        if path.is_dir():
            repository.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.is_file():
            repository.log_artifact(str(path), artifact_path=artifact_path)


def _moved(db: Path, experiment_id: str, old: str, new: str) -> None:
    """The store in an experiment folder that was moved or copied: its artifact locations (MLflow
    keeps them absolute, and has no call that changes them) follow the folder, so that the copy
    writes into itself and never into the original."""
    import sqlite3
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, experiment_id))
        connection.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                           "AND substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, experiment_id, len(old), old))
    connection.close()


def _params(values: dict) -> list:
    from mlflow.entities import Param
    return [Param(k, str(v)[:6000]) for k, v in sorted(values.items())]
