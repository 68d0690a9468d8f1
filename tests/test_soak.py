"""The soak of bench/soak.py, short: the tiny search on nodes started by docs/cluster.md's manual flow
as written (a token, `ray start --head`, `RAY_AUTH_MODE=token ray start --address` for each worker)
through one fault of each kind (a trial's worker killed while it trains and while it saves, a worker
node lost and another joining, the driver interrupted and killed, the experiment moved between two
resumes) ends where the undisturbed search ends."""
import pytest

from bench.soak import KINDS, manual_flow, run


def test_the_manual_flow_is_a_token_a_head_workers_and_a_search_with_address():
    flow = manual_flow()
    assert [c.split(" --")[0] for c in flow] == [
        ".venv/bin/ray get-auth-token", ".venv/bin/ray start", "RAY_AUTH_MODE=token .venv/bin/ray start",
        ".venv/bin/python -m search.run"]
    assert "--head" in flow[1] and "--address <head-ip>:6379" in flow[2] and "--address <head-ip>:6379" in flow[3]


@pytest.mark.own_ray
def test_a_short_soak_loses_no_trial_repeats_none_and_keeps_ashas_decisions(tmp_path):
    row = run(tmp_path / "soak", trials=6, faults=len(KINDS), max_epochs=3, workers=2, seed=0, fault_seed=0, gap=(1, 1))
    assert row["faults"] == len(KINDS) and all(row[k] == 1 for k in KINDS), row
    assert row["lost"] == 0 and row["duplicated"] == 0 and row["trials"] == 6, row
    assert row["journal_ok"] and row["continuity_ok"] and row["asha_same"], row
    assert row["max_stall_s"] <= 240, row
