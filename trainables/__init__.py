"""What one trial runs: data loading and splitting, model construction, the training loop.

Nothing here knows about the search; `search/` imports from here, never the other way round.
"""


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad image, bad flag).

    The command-line entry points print its message on one line and exit with status 2,
    without a traceback.
    """
