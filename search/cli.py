"""What the entry points share: flags built from an options dataclass, and one error handler.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_flags(parser, FinalizeOptions)
    >>> options = from_flags(parser.parse_args(argv), FinalizeOptions)
    >>> sys.exit(handle_errors(lambda: finalize(options)))
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import MISSING, fields

from core.errors import UserError


def add_flags(parser: argparse.ArgumentParser, options_class, *, only: tuple[str, ...] | None = None,
              profiles: dict[str, dict] | None = None) -> None:
    """One flag per field of `options_class` (or of `only`), the class's own fields first: `--top-k`
    for `top_k`, with the field's default, help and choices (checked with the options, so that a bad
    value gets the same one-line error from the command line and from Python); a bool that
    defaults to True becomes `--no-<name>`; one marked `repeat` may be given several times (a list);
    one with a `bare` value may be given without a value, and then takes it. A
    field that `profiles` fill in says so in its help."""
    own = options_class.__annotations__
    for f in sorted(fields(options_class), key=lambda f: f.name not in own):
        if only is not None and f.name not in only:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        help = meta["help"]
        notes = [f"one of {', '.join(map(str, meta['choices']))}"] if "choices" in meta else []
        filled = {name: values[f.name] for name, values in (profiles or {}).items() if f.name in values}
        if filled:
            notes.append("profile " + ", ".join(f"{name}: {value}" for name, value in filled.items()))
        elif f.default not in (None, MISSING) and not isinstance(f.default, bool):
            notes.append(f"default: {f.default}")
        help += f" ({'; '.join(notes)})" if notes else ""
        if isinstance(f.default, bool):
            parser.add_argument(f"--no-{f.name.replace('_', '-')}" if f.default else flag, dest=f.name,
                                action="store_false" if f.default else "store_true", help=help)
            continue
        extra = {"type": meta["type"]} if "type" in meta else {}  # choices are checked with the options
        if meta.get("repeat"):
            extra["action"] = "append"
        if "bare" in meta:
            extra.update(nargs="?", const=meta["bare"])
        if f.default is MISSING:
            extra["required"] = True
        else:
            extra["default"] = f.default
        parser.add_argument(flag, help=help, **extra)


def from_flags(args: argparse.Namespace, options_class):
    """The options dataclass from parsed flags (fields without a flag keep their default)."""
    return options_class(**{f.name: getattr(args, f.name) for f in fields(options_class) if hasattr(args, f.name)})


def handle_errors(work, *, interrupted: str = "interrupted") -> int:
    """Run `work()`; a warning prints as one `warning:` line, a UserError as one `error:` line (exit
    2), Ctrl-C as its own message or `interrupted` (exit 130); anything else is a bug and keeps its
    traceback."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line
            work()
    except UserError as exc:
        print(f"error: {exc}{exc.flags()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(str(exc) or interrupted, file=sys.stderr)
        return 130
    return 0


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
