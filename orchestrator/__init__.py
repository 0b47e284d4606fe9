"""compat-orchestrator: simulate and measure the life of embedding models on Ray.

Public surface: :func:`load_config`, :class:`ExperimentConfig`, :func:`run_experiment` and the typed
errors. Everything under ``orchestrator._internal`` is private.
"""

from orchestrator.config import ExperimentConfig, load_config
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


def run_experiment(*args, **kwargs):
    """Run an experiment end to end; see :func:`orchestrator.engine.driver.run_experiment`."""
    from orchestrator.engine.driver import run_experiment as _run

    return _run(*args, **kwargs)
