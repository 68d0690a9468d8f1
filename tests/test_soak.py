"""A short soak (bench/soak.py): a head and two worker nodes started by docs/cluster.md's manual flow
as written (a token, `ray start --head`, `RAY_AUTH_MODE=token ray start --address`, the search with
--address), one search run undisturbed and then through one fault of each kind, single and paired."""
import pytest

from bench.soak import KINDS, PAIRED, STALL_LIMIT, run
from bench.soak_cluster import manual_flow


def test_the_manual_flow_is_a_token_a_head_workers_and_a_search_with_address():
    flow = manual_flow()
    assert [c.split(" --")[0] for c in flow] == [
        ".venv/bin/ray get-auth-token", ".venv/bin/ray start", "RAY_AUTH_MODE=token .venv/bin/ray start",
        ".venv/bin/python -m search.run"]
    assert "--head" in flow[1] and "--address <head-ip>:6379" in flow[2] and "--address <head-ip>:6379" in flow[3]


@pytest.mark.own_ray
def test_a_search_through_a_lost_node_killed_workers_and_drivers_and_a_move_ends_as_undisturbed(tmp_path):
    """Every trial ends once, continued from its checkpoint; ASHA stops the same trials at the same
    epochs; the Optuna journal replays after every fault and ends with every trial COMPLETE or PRUNED;
    one MLflow run per trial; each Ctrl-C exits 130 naming the command that continues, and a half line
    a SIGKILL left in the journal is cut off on resume; Ray's errors are one `engine:` line each. The
    faults come one at a time (a worker killed in a save, the driver interrupted and the experiment
    moved), then two at once: a worker killed as its node is lost, the driver killed during a save."""
    # each single fault that another kind holds is left to it: a worker killed in training and a node lost
    # to the paired one, the driver killed to the one during a save, a Ctrl-C to the move (a Ctrl-C, then
    # the folder moved, then --resume)
    kinds = (tuple(k for k in KINDS if k not in ("worker_train", "node_lost", "driver_sigint", "driver_sigkill"))
             + PAIRED)
    row = run(tmp_path / "soak", trials=6, faults=len(kinds), max_epochs=3, workers=2, seed=0, fault_seed=0, gap=(1, 1),
              kinds=kinds)
    assert row["mode"] == "single + paired" and row["max_retries"] == len(kinds) + 2, row
    assert row["faults"] == len(kinds) and all(row[k] == 1 for k in kinds), row
    assert row["save_kills_landed"] <= row["worker_save"] + row["driver_during_save"], row
    assert row["trials"] == 6 and row["lost"] == 0 and row["duplicated"] == 0, row
    assert row["journal_ok"] and row["continuity_ok"] and row["asha_same"] and row["mlflow_ok"], row
    assert row["drivers_ok"] and row["engine_lines"] >= 2, row  # a worker killed, a node lost: at least two
    assert row["max_stall_s"] <= STALL_LIMIT, row
