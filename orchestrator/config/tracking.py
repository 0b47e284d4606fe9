"""The ``tracking:`` section: which experiment trackers receive a run's config, metrics and artefacts.

Tracking observes a run and never changes what it computes, so the section is left out of the config
digest: adding or changing it neither moves a number nor stops ``--resume`` (the packages each
tracker needs are checked before a run writes anything, see orchestrator/reporting/tracking.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from orchestrator.config.typed import require


@dataclass
class MLflowTracking:
    """Log to MLflow, through Ray's MLflow integration."""

    # a tracking server (http://...), a database (sqlite:///mlflow.db) or a local directory (current MLflow
    # refuses directories unless MLFLOW_ALLOW_FILE_STORE=true); unset: MLFLOW_TRACKING_URI, else MLflow's default
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # the MLflow experiment the run is logged to; unset: the experiment's name

    def __post_init__(self):
        require(self.experiment is None or bool(self.experiment.strip()), "experiment", "must not be empty")


@dataclass
class WandbTracking:
    """Log to Weights & Biases, through Ray's W&B integration."""

    project: Optional[str] = None  # unset: WANDB_PROJECT, else the experiment's name
    entity: Optional[str] = None  # the W&B team or user; unset: W&B's default
    # offline: no network, the run stays in <dir>/wandb until `wandb sync` uploads it; unset: WANDB_MODE, else online
    mode: Optional[Literal["online", "offline"]] = None
    dir: Optional[str] = None  # the directory W&B writes its wandb/ folder into; unset: the run (or sweep) directory

    def __post_init__(self):
        require(self.project is None or bool(self.project.strip()), "project", "must not be empty")


@dataclass
class TensorBoardTracking:
    """Write TensorBoard event files (tensorboardX, which Ray Tune uses too)."""

    dir: Optional[str] = None  # the log directory; unset: RUN_DIR/tensorboard (a sweep: SWEEP_DIR/tensorboard)


@dataclass
class TrackingConfig:
    """Experiment trackers (docs/guide/tracking.md): each one set, even to `{}`, receives the resolved
    config, every step's metrics as it finishes, and at the end the summary metrics, the matrices and
    the report's files; `pip install 'compat-orchestrator[tracking]'` installs all three."""

    mlflow: Optional[MLflowTracking] = None  # e.g. {tracking_uri: http://mlflow:5000}
    wandb: Optional[WandbTracking] = None  # e.g. {project: compat, mode: offline}
    tensorboard: Optional[TensorBoardTracking] = None  # e.g. {} (event files in RUN_DIR/tensorboard)

    @property
    def enabled(self) -> bool:
        return any(backend is not None for backend in (self.mlflow, self.wandb, self.tensorboard))
