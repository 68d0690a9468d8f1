"""`leaderboard.csv` (one row per trial, best first) and the console progress, kept up to date
by a Ray Tune callback while the search runs.

Example:
    >>> board = pd.read_csv("experiments/backbones-20261123-0100/leaderboard.csv")
    >>> board.head(3)[["trial_id", "val_auc", "backbone", "lr", "stopped_early"]]
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
from ray import tune

from core.formatting import clock
from search.outputs.records import write_atomic
from trainables.config import DEFAULT_CONFIG
from core.choices import METRIC_MODES

VAL_METRICS = tuple(METRIC_MODES)
KEPT = (*VAL_METRICS, *(f"{m}_std" for m in VAL_METRICS))  # of a trial's best epoch; _std: over folds


def leaderboard(trials, best: dict[str, dict], *, metric: str, mode: str, stopped: set[str],
                ended: dict[str, float]) -> pd.DataFrame:
    """One row per trial, best first: id, status, the metric and the other validation metrics at
    the trial's best epoch (with their spread over folds when the search cross-validates), epochs
    run, whether ASHA stopped it, wall seconds, when it ended (seconds after the search started),
    model size, every config key, and a failed trial's error."""
    spread = [k for k in KEPT[len(VAL_METRICS):] if any(k in b for b in best.values())]
    rows = []
    for trial in trials:
        top = best.get(trial.trial_id, {})
        last = trial.last_result or {}
        status = trial.status
        if status == "TERMINATED" and trial.trial_id not in ended:
            status = "INTERRUPTED"  # stopped by Ctrl-C or the time budget, not finished: --resume reruns it
        row = {"trial_id": trial.trial_id, "status": status}
        row[metric] = top.get(metric)
        row.update({m: top.get(m) for m in (*VAL_METRICS, *spread) if m != metric})
        row.update(best_epoch=top.get("training_iteration"), epochs=last.get("training_iteration", 0),
                   stopped_early=trial.trial_id in stopped, wall_seconds=round(last.get("time_total_s", 0.0), 1),
                   ended_s=round(ended[trial.trial_id], 1) if trial.trial_id in ended else None,
                   params_m=last.get("params_m"), trainable_params_m=last.get("trainable_params_m"),
                   node_ip=last.get("node_ip"))
        row.update({k: trial.config.get(k) for k in _config_keys(trials)})
        row["error"] = _error_line(trial) if trial.status == "ERROR" else ""
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board = board.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.reset_index(drop=True)


def by_backbone(board: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Per backbone: trials, the best and median metric, the best trial, epochs and early stops."""
    if board.empty or "backbone" not in board:
        return pd.DataFrame()
    best = board.groupby("backbone", sort=False).head(1).set_index("backbone")
    agg = board.groupby("backbone").agg(trials=("trial_id", "size"), **{
        f"median_{metric}": (metric, "median"), "mean_epochs": ("epochs", "mean"),
        "stopped_early": ("stopped_early", "sum"), "failed": ("status", lambda s: int((s == "ERROR").sum()))})
    agg.insert(0, f"best_{metric}", best[metric])
    agg.insert(1, "best_trial_id", best["trial_id"])
    return agg.sort_values(f"best_{metric}", ascending=(mode == "min"), na_position="last").reset_index()


def _config_keys(trials) -> list[str]:
    seen = dict.fromkeys(k for t in trials for k in t.config)
    order = [k for k in DEFAULT_CONFIG if k in seen] + [k for k in seen if k not in DEFAULT_CONFIG]
    return order


def _error_line(trial) -> str:
    text = trial.get_error() or ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "failed"


class LeaderboardCallback(tune.Callback):
    """Rewrites the leaderboards as trials end and prints one progress line: trials done, running,
    stopped early and failed, the best so far, and an estimate of the time left."""

    def __init__(self, folder: str | Path, *, metric: str, mode: str, num_samples: int,
                 time_budget: float | None, scheduler, print_every: float = 60):
        self.folder = Path(folder)
        self.metric, self.mode = metric, mode
        self.num_samples, self.time_budget, self.scheduler = num_samples, time_budget, scheduler
        self.best: dict[str, dict] = {}
        self.ended: dict[str, float] = {}
        self.failed: set[str] = set()
        self.stopped_before: set[str] = set()  # ASHA stops recorded before a --resume
        self.started = time.time()
        self.print_every, self.last_print = print_every, 0.0
        self.epoch_started: dict[str, float] = {}  # per running trial: when its current epoch began

    def setup(self, **info):
        """Called at the start and again after `--resume`: take back what the leaderboard on disk
        knows of trials that ended before (their best epoch, when they ended, ASHA stops)."""
        path = self.folder / "leaderboard.csv"
        if not path.exists() or path.stat().st_size == 0:
            return
        old = pd.read_csv(path)
        for row in old.to_dict("records"):
            tid = row["trial_id"]
            if tid not in self.best and pd.notna(row.get(self.metric)):
                self.best[tid] = {**{m: row[m] for m in KEPT if m in row}, "training_iteration": row.get("best_epoch")}
            if tid not in self.ended and pd.notna(row.get("ended_s")):
                self.ended[tid] = row["ended_s"]
            if bool(row.get("stopped_early")):
                self.stopped_before.add(tid)
        self.started = time.time() - max(self.ended.values(), default=0.0)

    def better(self, a, b) -> bool:
        if a is None or (isinstance(a, float) and math.isnan(a)):
            return False
        return b is None or (a > b if self.mode == "max" else a < b)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.epoch_started[trial.trial_id] = time.time()

    def on_step_end(self, iteration, trials, **info):
        """A line at least every `print_every` seconds, also while every trial is inside a long epoch."""
        if time.time() - self.last_print > self.print_every:
            self.report(trials, running_detail=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epoch_started[trial.trial_id] = time.time()
        if result.get("checkpoint_unreadable"):
            print(f"  warning: trial {trial.trial_id}: checkpoint {result['checkpoint_unreadable']}", flush=True)
        kept = self.best.get(trial.trial_id)
        if kept is None or self.better(result.get(self.metric), kept.get(self.metric)):
            self.best[trial.trial_id] = {k: result[k] for k in (*KEPT, "training_iteration") if k in result}
        if time.time() - self.last_print > self.print_every:
            self.report(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.time() - self.started
        self.write(trials)
        self.report(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.time() - self.started
        self.failed.add(trial.trial_id)
        self.write(trials)
        print(f"  trial {trial.trial_id} failed: {_error_line(trial)} (full trace: {trial.error_file})",
              flush=True)
        self.report(trials)

    def on_experiment_end(self, trials, **info):
        self.write(trials)

    def stopped(self) -> set[str]:
        """Trials ASHA stopped, in this run and before a --resume."""
        return self.stopped_before | (self.scheduler.stopped if self.scheduler else set())

    def table(self, trials) -> pd.DataFrame:
        return leaderboard(trials, self.best, metric=self.metric, mode=self.mode, ended=self.ended,
                           stopped=self.stopped())

    def write(self, trials) -> pd.DataFrame:
        board = self.table(trials)
        write_atomic(self.folder / "leaderboard.csv", lambda p: board.to_csv(p, index=False))
        per_backbone = by_backbone(board, self.metric, self.mode)
        write_atomic(self.folder / "leaderboard_by_backbone.csv", lambda p: per_backbone.to_csv(p, index=False))
        return board

    def report(self, trials, *, running_detail: bool = False) -> None:
        self.last_print = time.time()
        elapsed = self.last_print - self.started
        # Ray calls on_trial_complete before the trial's status changes: count what ended here
        done = len(self.ended)
        running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
        stopped = len(self.stopped())
        line = (f"[{clock(elapsed)}] trials {done}/{self.num_samples} done ({stopped} stopped early by "
                f"ASHA, {len(self.failed)} failed), {running} running")
        scored = {k: v for k, v in self.best.items() if v.get(self.metric) is not None}
        if scored:
            top = min(scored, key=lambda k: -scored[k][self.metric] if self.mode == "max" else scored[k][self.metric])
            backbone = next((t.config.get("backbone") for t in trials if t.trial_id == top), "")
            line += f" | best {self.metric} {scored[top][self.metric]:.4f} ({top}, {backbone})"
        if done and done < self.num_samples:
            eta = elapsed / done * (self.num_samples - done)
            if self.time_budget:
                eta = min(eta, max(0.0, self.time_budget - elapsed))
            line += f" | ETA ~{clock(eta)}"
        if running_detail:
            now = [f"{t.trial_id} {t.config.get('backbone', '')} epoch {(t.last_result or {}).get('training_iteration', 0) + 1} "
                   f"for {clock(self.last_print - self.epoch_started.get(t.trial_id, self.last_print))}"
                   for t in trials if t.status == "RUNNING" and t.trial_id not in self.ended]
            line += f" | in progress: {'; '.join(now)}" if now else ""
        print(line, flush=True)


def print_summary(board: pd.DataFrame, folder: Path, *, metric: str) -> None:
    if board.empty:
        print(f"no trial finished; see {folder}")
        return
    cols = [c for c in ("rank", "trial_id", "status", metric, "epochs", "stopped_early", "backbone", "recipe", "lr")
            if c in board]
    print(f"\nleaderboard: {folder / 'leaderboard.csv'}")
    print(board[cols].head(10).to_string(index=False))
    stopped = int(board["stopped_early"].sum())
    print(f"{len(board)} trials, {stopped} stopped early by ASHA, "
          f"{int((board['status'] == 'ERROR').sum())} failed")
