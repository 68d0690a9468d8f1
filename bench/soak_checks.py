"""What the soak (bench/soak.py) checks of a search run through faults, against the undisturbed run."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def results(folder: Path) -> dict[str, list[dict]]:
    from search.engine.checkpoints import results as trial_results
    return {t.name[len("trial_"):]: trial_results(t) for t in sorted(folder.glob("trial_*"))}


def epochs_seen(folder: Path) -> int:
    return sum(len(rows) for rows in results(folder).values())


def outcome(board: pd.DataFrame) -> list[tuple]:
    return sorted(zip(board["backbone"], board["lr"].round(10), board["epochs"], board["stopped_early"]))


def mlflow_runs_ok(folder: Path, board: pd.DataFrame) -> bool:
    """One MLflow run per trial under one parent, each FINISHED with one value per epoch it ran and
    ASHA's stop tagged, whatever the faults did."""
    from mlflow.tracking import MlflowClient

    from search.engine.tracking import tracking_uri
    client = MlflowClient(tracking_uri(folder, "experiment"))
    runs = client.search_runs([client.get_experiment_by_name(folder.name).experiment_id])
    by_trial = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    if len(runs) != len(board) + 1 or set(by_trial) != set(board["trial_id"]):
        return False
    for row in board.to_dict("records"):
        run = by_trial[row["trial_id"]]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_auc"))
        if (run.info.status != "FINISHED" or steps != list(range(1, row["epochs"] + 1))
                or run.data.tags.get("stopped_early") != str(bool(row["stopped_early"])).lower()):
            return False
    return True


def compare(whole: Path, soaked: Path, *, trials: int, max_epochs: int, struck_at: list[float]) -> dict:
    """The soaked search against the undisturbed one (see the module docstring). An epoch may be
    trained again once per fault that struck between the trial's first and last report (the epoch
    in flight, or one whose checkpoint the fault kept from being registered)."""
    from search.engine.checkpoints import registered
    from search.engine.tuner import load_study
    board, reference = pd.read_csv(soaked / "leaderboard.csv"), pd.read_csv(whole / "leaderboard.csv")
    ended = board[board["status"] == "TERMINATED"]
    study = load_study(soaked).get_trials(deepcopy=False)
    ray_ids = [t.user_attrs.get("ray_trial_id") for t in study]
    journal_ok = (all(t.state.name in ("COMPLETE", "PRUNED") for t in study)
                  and all(sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1)) for t in study))
    duplicated = (len(board) - board["trial_id"].nunique()) + (len(ray_ids) - len(set(ray_ids))) \
        + len(set(ray_ids) ^ set(board["trial_id"]))
    continuity, held = [], set(board["trial_id"])
    trial_rows = results(soaked)
    orphans = sorted(set(trial_rows) - held)  # started by a driver killed before it recorded them
    for trial_id, rows in [(t, r) for t, r in trial_rows.items() if t in held]:
        epochs = [r["epoch"] for r in rows]
        saved = registered(soaked / f"trial_{trial_id}")  # newest first
        last_saved = max((r["epoch"] for r in rows if saved and r.get("checkpoint_dir_name") == saved[0].name), default=0)
        continuity.append(bool(epochs) and sorted(set(epochs)) == list(range(1, max(epochs) + 1))
                          and len(epochs) - len(set(epochs)) <= _faults_within(rows, struck_at)
                          and last_saved == max(epochs))
    return {"trials": int(ended["trial_id"].nunique()), "lost": trials - int(ended["trial_id"].nunique()),
            "duplicated": int(duplicated), "journal_ok": bool(journal_ok), "continuity_ok": all(continuity),
            "orphans": len(orphans),
            "asha_same": outcome(board) == outcome(reference) and int(board["epochs"].max()) <= max_epochs,
            "mlflow_ok": mlflow_runs_ok(soaked, board)}


def _faults_within(rows: list[dict], struck_at: list[float]) -> int:
    first, last = rows[0]["timestamp"] - 1, rows[-1]["timestamp"] + 1  # Ray's timestamps are whole seconds
    return sum(first <= moment <= last for moment in struck_at)
