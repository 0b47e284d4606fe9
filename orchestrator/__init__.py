"""compat-orchestrator: simulate and measure the life of embedding models on Ray.

Public surface: :func:`load_config`, :func:`run_experiment`, :class:`ExperimentConfig` and the typed
errors. Packages by concern (``config``, ``engine``, ``storage``, ``evaluation``, ``reporting``,
``tuning``, ``data``) hold the rest; imports between them flow one way (tests/test_layers.py).
"""

from orchestrator.config import ExperimentConfig
from orchestrator.errors import CheckpointError, CompatError, ConfigError, DataError, RunError, StoreError

__all__ = [
    "CheckpointError",
    "CompatError",
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "RunError",
    "StoreError",
    "load_config",
    "run_experiment",
]


def load_config(config=None, overrides=()):
    """A config file (``None``: the built-in quickstart) with ``--set`` overrides, parsed and checked
    (schema, cross-section checks, every method's parameters) before anything is written."""
    from orchestrator.engine.validate import load_experiment

    return load_experiment(config, list(overrides))


def run_experiment(*args, **kwargs):
    """Run an experiment end to end; see :func:`orchestrator.engine.driver.run_experiment`."""
    from orchestrator.engine.driver import run_experiment as _run

    return _run(*args, **kwargs)
