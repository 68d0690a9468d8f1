"""The search: an Optuna sampler behind Ray Tune with ASHA (`tuner`, `samplers`), the stop rule,
warm starts, checkpoints read safely, the cluster and its cores, the leaderboard, tracking, and the
search from start to end (`experiment`). Every reach into Ray's or Optuna's internals is in
`ray_internals`."""
