"""Helpers shared by test modules (pytest puts this directory on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess

from orchestrator.config import ExperimentConfig
from orchestrator import load_config


def config_under(directory, *overrides: str) -> ExperimentConfig:
    """The built-in quickstart with ``overrides``, its run directory under ``directory``."""
    return load_config(None, [*overrides, f"output_dir={directory}"])


def stop_ray_head(head: subprocess.Popen) -> None:
    """Stop a ``ray start --head --block`` process started in a session of its own, and everything it
    started: SIGTERM (``--block`` stops its processes), then SIGKILL to that session only."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
