"""Named search spaces, found by name like timm's models.

A space is a define-by-run function of an Optuna trial: it only calls `trial.suggest_*`,
branches on what it drew (the freezing depth depends on the backbone), and returns constants.
Adding a space is adding one decorated function to a module imported below.

Example:
    >>> list_spaces()
    ['backbones', 'recipes', 'tiny']
    >>> space = get_space("backbones")
    >>> study = optuna.create_study(direction="maximize")
    >>> trial = study.ask()
    >>> config = space.sample(trial)           # {'backbone': ..., 'lr': ..., ...}
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

from trainables import UserError


@dataclass(frozen=True)
class Space:
    """A registered space: its define-by-run function and what the search needs to know of it.

    `backbones`: the backbones it may draw (its `backbones` option); `cpu_backbones`: the cheaper
    default on a CPU-only machine; `points`: configs to evaluate first (the fixed recipes);
    `fixed`: True when the space is exactly its points (run each once).
    """

    name: str
    define: Callable[..., dict | None]
    backbones: tuple[str, ...]
    cpu_backbones: tuple[str, ...] | None = None
    points: tuple[dict, ...] = ()
    fixed: bool = False
    description: str = ""

    def sample(self, trial, **options) -> dict:
        """Run the define-by-run function on `trial`; return the config (drawn and constant keys)."""
        constants = self.define(trial, **options) or {}
        return {**trial.params, **constants}


_SPACES: dict[str, Space] = {}


def register_space(name: str, *, backbones, cpu_backbones=None, points=(), fixed: bool = False):
    """Decorator registering a define-by-run function `fn(trial, *, backbones, stages, pretrained)`."""
    def wrap(fn):
        _SPACES[name] = Space(name=name, define=fn, backbones=tuple(backbones),
                              cpu_backbones=tuple(cpu_backbones) if cpu_backbones else None,
                              points=tuple(points), fixed=fixed,
                              description=(fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return wrap


def list_spaces(pattern: str = "*") -> list[str]:
    """Registered space names matching a shell-style pattern."""
    return sorted(n for n in _SPACES if fnmatch.fnmatch(n, pattern))


def get_space(name: str) -> Space:
    """The registered space called `name`.

    Raises:
        UserError: no such space; the message lists the known ones.
    """
    if name not in _SPACES:
        raise UserError(f"unknown space {name!r}; known spaces: {', '.join(list_spaces())}")
    return _SPACES[name]


from spaces import backbones, recipes, tiny  # noqa: E402,F401  (fill the registry)
