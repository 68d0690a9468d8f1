"""What one trial runs: the model (a timm backbone, its freezing and head), the training loop, the
trial config's checks and the Ray Tune trainable. The data it reads comes from the `ingest` package.

Nothing here knows about the search: `search/` imports from here, never the other way round.
"""
