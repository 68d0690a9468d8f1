"""bench/soak.py starts its nodes with docs/cluster.md's manual flow as written (a token, `ray start
--head`, `RAY_AUTH_MODE=token ray start --address` for each worker, the search with --address)."""
from bench.soak import manual_flow


def test_the_manual_flow_is_a_token_a_head_workers_and_a_search_with_address():
    flow = manual_flow()
    assert [c.split(" --")[0] for c in flow] == [
        ".venv/bin/ray get-auth-token", ".venv/bin/ray start", "RAY_AUTH_MODE=token .venv/bin/ray start",
        ".venv/bin/python -m search.run"]
    assert "--head" in flow[1] and "--address <head-ip>:6379" in flow[2] and "--address <head-ip>:6379" in flow[3]
