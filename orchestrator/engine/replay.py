"""Replay memory and balanced batches (docs/methods/stationary.md), for any method.

After each step, a fixed number of random exemplars of each of its new classes joins the memory (the
quota is never redistributed). Every later step trains on its new data plus the memory, in batches
made of ``batch_share`` memory samples and the rest new samples. The memory is a list of training-split
indices saved in the run directory after each step, so a resumed run replays exactly the same samples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from orchestrator.storage import runfiles
from orchestrator.config import ReplayConfig
from orchestrator.errors import RunError
from orchestrator.engine.scenarios import Step


def select_exemplars(indices: np.ndarray, positions: np.ndarray, classes: range, per_class: int,
                     rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random entries of ``indices`` for each class position in ``classes`` (all of a
    class's entries when it has fewer), sorted within each class."""
    picked = []
    for cls in classes:
        members = indices[positions[indices] == cls]
        picked.append(np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False)))
    return np.concatenate(picked) if picked else indices[:0]


def balanced_order(new: np.ndarray, memory: np.ndarray, batch_size: int, memory_share: float,
                   seed: Sequence[int], rank: int = 0, world_size: int = 1) -> np.ndarray:
    """One epoch of balanced batches for ``rank``, flattened: each consecutive ``batch_size`` entries are
    one batch of ``memory_count(batch_size, memory_share)`` memory indices followed by new indices.

    Every rank draws the same global batches (``world_size`` times larger) from ``seed`` and keeps its
    strided share, so the union over ranks is one balanced batch. A pool is drawn with replacement when
    it holds no more samples than its share of a global batch (the reference sampler's ``<=``: a pool the
    size of its share is also drawn with replacement). Batches per epoch: ⌊(|new| + |memory|) / global
    batch⌋, at least one.
    """
    per_memory = memory_count(batch_size, memory_share)
    per_new = batch_size - per_memory
    num_batches = max(1, (len(new) + len(memory)) // (batch_size * world_size))
    rng = np.random.default_rng(list(seed))
    out = np.empty((num_batches, batch_size), dtype=np.int64)
    for b in range(num_batches):
        for pool, count, offset in ((memory, per_memory, 0), (new, per_new, per_memory)):
            drawn = rng.choice(pool, size=count * world_size, replace=len(pool) <= count * world_size)
            out[b, offset:offset + count] = drawn[rank::world_size]
    return out.reshape(-1)


def memory_count(batch_size: int, memory_share: float) -> int:
    """Memory samples in a batch: the share rounded, keeping at least one sample of each kind."""
    return min(max(round(batch_size * memory_share), 1), max(batch_size - 1, 1))


class ReplayMemory:
    """The memory of one method's run: read before a step, extended and saved after it."""

    def __init__(self, cfg: ReplayConfig, run: runfiles.Run, method_key: str, seed: int, positions: np.ndarray):
        self.cfg, self.run, self.method_key, self.seed = cfg, runfiles.storage(run), method_key, seed
        self.positions = positions  # class position of every training-split sample

    def before(self, step: Step) -> np.ndarray:
        """Training indices in the memory when ``step`` starts (empty for the first step)."""
        if step.index == 0:
            return np.zeros(0, dtype=np.int64)
        key = runfiles.replay_key(self.method_key, step.index - 1)
        if not self.run.exists(key):
            raise RunError(f"replay memory {self.run.location_of(key)} is missing although step {step.index - 1} is done; "
                           f"delete {self.run.location_of(runfiles.manifest_key(self.method_key, step.index - 1))} and "
                           "resume (that step and every later one are recomputed)")
        return np.asarray(self.run.read_json(key)["indices"], dtype=np.int64)

    def after(self, step: Step, trained: np.ndarray) -> dict[str, dict]:
        """Add exemplars of ``step``'s new classes from the samples it ``trained`` on and save the memory;
        returns its record for the step's manifest entry."""
        rng = np.random.default_rng([self.seed, 4099, step.index])
        added = select_exemplars(trained, self.positions, range(step.num_previous, step.num_seen),
                                 self.cfg.per_class, rng)
        memory = np.concatenate([self.before(step), added])
        key = runfiles.replay_key(self.method_key, step.index)
        return runfiles.artefact_records({key: self.run.write_json(key, {
            "indices": memory.tolist(), "per_class": self.cfg.per_class,
            "classes": int(len(np.unique(self.positions[memory]))),
        })})
