"""The Optuna samplers a search can use, by name (`--sampler`).

Example:
    >>> sampler = SAMPLERS["tpe"](seed=0)              # models after Optuna's 10 random trials
    >>> sampler = SAMPLERS["tpe"](seed=0, startup=4)   # after the 4 first trials (one per backbone)
"""
from __future__ import annotations

import warnings

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# `startup`: finished trials before a model-based sampler stops drawing at random (Optuna's default 10).
# A search that tries each backbone first has those trials as its start: at the CPU profile's budget a
# CT search runs 9-12 trials, and with 10 random ones first TPE would never model anything.
SAMPLERS = {
    "tpe": lambda seed, startup=10: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                               n_startup_trials=startup),
    "random": lambda seed, startup=10: optuna.samplers.RandomSampler(seed=seed),
    "qmc": lambda seed, startup=10: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
    "gp": lambda seed, startup=10: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup),
}
