"""Helpers shared by test modules (pytest puts this directory on sys.path)."""

from __future__ import annotations

from orchestrator.config import ExperimentConfig
from orchestrator import load_config


def config_under(directory, *overrides: str) -> ExperimentConfig:
    """The built-in quickstart with ``overrides``, its run directory under ``directory``."""
    return load_config(None, [*overrides, f"output_dir={directory}"])
