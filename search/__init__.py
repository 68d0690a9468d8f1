"""The search's commands, one module each at this level: `run` (search, then finalize), `finalize`,
`predict` and `audit`, with what they share (`cli`: flags and the error handler; `options`: every
option as plain data). Each stage lives in a subpackage below them, and imports flow downward only:

- `search.outputs`: what every stage writes and measures: files written whole (`records`), every
  figure (`plots`), the clinical read-out (`evaluate`) and calibration;
- `search.data`: a search's data set up once (loaded, audited, split) and external test sets;
- `search.engine`: the search itself: Ray Tune, Optuna samplers, ASHA, the stop rule, warm starts,
  checkpoints, the leaderboard, tracking, and every reach into Ray's or Optuna's internals;
- `search.final`: finalize and the report: retraining, the ensemble, saliency, external read-out.
"""
