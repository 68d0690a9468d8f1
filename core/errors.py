"""The one error a user can fix."""
from __future__ import annotations


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad image, bad flag).

    `option`: the option (a field of `search.options`) that sets what went wrong, or a tuple of them.
    The library words its message in the data's terms; the command line adds the flags to use:

        >>> raise UserError("a class of train+val has only 3 images, too few for 5 folds", option="folds")
        error: a class of train+val has only 3 images, too few for 5 folds (--folds)

    The command-line entry points print it on one line and exit with status 2, without a traceback.
    """

    def __init__(self, message: str, *, option: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.options = (option,) if isinstance(option, str) else tuple(option or ())

    def flags(self) -> str:
        """The options as the command line spells them: " (--folds)", or "" where there are none."""
        return f" ({', '.join('--' + o.replace('_', '-') for o in self.options)})" if self.options else ""
