"""Scenarios: the class order, the ordered steps, and which training samples each step sees.

Labels inside the engine are *class positions*: position p is the p-th class of the class order, so
after step t the classes seen are always positions 0..num_seen-1 and classifiers simply grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from orchestrator.config import ExperimentConfig


@dataclass(frozen=True)
class Resources:
    """Ray resources of a step; steps with equal resources can share one worker group."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float


@dataclass(frozen=True)
class Step:
    """One training episode: its classes, shots, model event and resources."""

    index: int
    num_previous: int  # classes seen before this step (positions 0..num_previous-1)
    num_seen: int  # classes seen after this step
    train_from: int  # first class position this step trains on (0 = cumulative)
    shots: Optional[int]  # training examples per new class (None = all)
    event: str  # train | finetune | replace
    resources: Resources

    @property
    def version(self) -> int:
        return self.index


def class_order(cfg: ExperimentConfig, num_classes: int) -> np.ndarray:
    """Dataset labels in the order the scenario introduces them (natural, or a seeded permutation)."""
    if cfg.scenario.class_order == "natural":
        return np.arange(num_classes, dtype=np.int64)
    return np.random.default_rng(cfg.seed).permutation(num_classes).astype(np.int64)


def num_steps(cfg: ExperimentConfig, num_classes: int) -> int:
    sc = cfg.scenario
    if sc.num_steps is not None:
        return sc.num_steps
    return 1 + max(0, (num_classes - sc.initial_classes) // sc.increment)


def classes_needed(cfg: ExperimentConfig, steps: int) -> int:
    return cfg.scenario.initial_classes + cfg.scenario.increment * (steps - 1)


def step_resources(cfg: ExperimentConfig, index: int) -> Resources:
    res = cfg.resources
    override = res.steps.get(index)
    pick = (lambda name: getattr(override, name) if override and getattr(override, name) is not None
            else getattr(res, name))
    return Resources(num_workers=pick("num_workers"), use_gpu=pick("use_gpu"), cpus_per_worker=pick("cpus_per_worker"))


def plan_steps(cfg: ExperimentConfig, num_classes: int) -> list[Step]:
    """The scenario's steps, in order. Step 0 trains from scratch unless a replacement model is swapped in
    there; steps listed in ``scenario.replace_at`` are ``replace`` events."""
    sc = cfg.scenario
    steps = []
    for t in range(num_steps(cfg, num_classes)):
        seen = sc.initial_classes + sc.increment * t
        previous = 0 if t == 0 else seen - sc.increment
        cumulative = sc.training_data == "cumulative"
        steps.append(Step(
            index=t,
            num_previous=previous,
            num_seen=seen,
            train_from=0 if (cumulative or t == 0) else previous,
            shots=sc.shots if (sc.kind == "few-shot" and t > 0) else None,
            event="replace" if t in sc.replace_at else "train" if t == 0 else sc.event,
            resources=step_resources(cfg, t),
        ))
    return steps


def train_indices(positions: np.ndarray, step: Step, seed: int) -> np.ndarray:
    """Indices of the training samples a step sees; few-shot steps draw ``shots`` per new class,
    deterministically from (seed, step)."""
    selected = np.flatnonzero((positions >= step.train_from) & (positions < step.num_seen))
    if step.shots is None:
        return selected
    rng = np.random.default_rng([seed, step.index])
    picked = []
    for cls in range(step.num_previous, step.num_seen):
        members = selected[positions[selected] == cls]
        if len(members) < step.shots:
            from orchestrator.errors import DataError

            raise DataError(f"class position {cls} has {len(members)} training images, fewer than shots={step.shots}")
        picked.append(np.sort(rng.choice(members, size=step.shots, replace=False)))
    return np.concatenate(picked) if picked else selected[:0]
