"""The one error a user can fix."""


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad image, bad flag).

    The command-line entry points print its message on one line and exit with status 2,
    without a traceback.
    """
