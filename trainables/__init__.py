"""What one trial runs: the model (a timm backbone, its freezing and head), the training loop, the
trial config's checks and the Ray Tune trainable; and, in `trainables.ingest`, the data it reads.

Nothing here knows about the search: `search/` imports from here, never the other way round. The
ingest imports nothing else of `trainables` but `UserError` below.
"""


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad image, bad flag).

    The command-line entry points print its message on one line and exit with status 2,
    without a traceback.
    """
