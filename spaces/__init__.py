"""Named search spaces, found by name like timm's models.

A space is a define-by-run function of an Optuna trial: it only calls `trial.suggest_*`,
branches on what it drew (the freezing depth depends on the backbone), and returns constants.
Adding a space is adding one function decorated with `register_space` to a module imported below.

Example:
    >>> list_spaces()
    ['backbones', 'grid', 'lite', 'recipes', 'tiny']
    >>> space = get_space("backbones")
    >>> study = optuna.create_study(direction="maximize")
    >>> config = space.sample(study.ask(), backbones=space.backbones, stages=stages, pretrained=True)
"""
from spaces import backbones, recipes, tiny  # noqa: F401  (each fills the registry)
from spaces._registry import Space, UnknownSpace, get_space, list_spaces, register_space

__all__ = ["Space", "UnknownSpace", "get_space", "list_spaces", "register_space"]
