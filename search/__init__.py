"""Orchestration: the search CLI (`python -m search.run`), the Tuner, leaderboards and outputs."""
