"""What one trial runs: the model (a timm backbone, its freezing and head), the training loop, the
trial config's checks and the Ray Tune trainable; and, in `trainables.ingest`, the data it reads.

Nothing here knows about the search: `search/` imports from here, never the other way round. The
ingest imports nothing else of `trainables`.
"""
