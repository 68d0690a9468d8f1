"""The registry of search spaces: a decorator fills a dict, and spaces are found by name (as
timm's `_registry.py` does for models). Space modules import `register_space` from here; the
package `__init__` imports the space modules; nothing imports back up."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Space:
    """A registered space: its define-by-run function and what the search needs to know of it.

    `backbones`: the backbones it may draw (its `backbones` option); `cpu_backbones`: the cheaper
    default on a CPU-only machine; `points`: configs to evaluate first (the fixed recipes);
    `fixed`: True when the space is exactly its points (run each once); `first_trial`: the values
    each backbone is tried with before the sampler takes over, `first_trial(backbone, pretrained=...)`
    (a dict, or a list of dicts for several first trials of one backbone).
    """

    name: str
    define: Callable[..., dict | None]
    backbones: tuple[str, ...]
    cpu_backbones: tuple[str, ...] | None = None
    points: tuple[dict, ...] = ()
    fixed: bool = False
    first_trial: Callable[..., dict] | None = None
    description: str = ""

    def sample(self, trial, **options) -> dict:
        """Run the define-by-run function on `trial`; return the config (drawn and constant keys)."""
        constants = self.define(trial, **options) or {}
        return {**trial.params, **constants}

    def first_trials(self, backbones, *, pretrained: bool) -> list[dict]:
        """The trials to enqueue before the sampler draws: the fixed points, or one trial per
        backbone at the space's first-trial values (so that no backbone is missed by chance)."""
        if self.points or self.first_trial is None:
            return list(self.points)
        per_backbone = {b: self.first_trial(b, pretrained=pretrained) for b in backbones}
        return [{"backbone": b, **values} for b, first in per_backbone.items()
                for values in (first if isinstance(first, list) else [first])]


class UnknownSpace(LookupError):
    """`get_space` was given a name no space is registered under."""


_SPACES: dict[str, Space] = {}


def register_space(name: str, *, backbones, cpu_backbones=None, points=(), fixed: bool = False, first_trial=None):
    """Decorator registering a define-by-run function `fn(trial, *, backbones, stages, pretrained)`."""
    def wrap(fn):
        _SPACES[name] = Space(name=name, define=fn, backbones=tuple(backbones),
                              cpu_backbones=tuple(cpu_backbones) if cpu_backbones else None,
                              points=tuple(points), fixed=fixed, first_trial=first_trial,
                              description=(fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return wrap


def list_spaces(pattern: str = "*") -> list[str]:
    """Registered space names matching a shell-style pattern."""
    return sorted(n for n in _SPACES if fnmatch.fnmatch(n, pattern))


def get_space(name: str) -> Space:
    """The registered space called `name`.

    Raises:
        UnknownSpace: no such space; the message lists the known ones.
    """
    if name not in _SPACES:
        raise UnknownSpace(f"unknown space {name!r}; known spaces: {', '.join(list_spaces())}")
    return _SPACES[name]
