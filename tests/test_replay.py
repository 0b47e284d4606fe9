"""Replay memory: per-class exemplar counts, balanced ½/½ batches, and both inside a real (in-process) run."""


import numpy as np
import pytest

from methods.base import register
from methods.er import ExperienceReplay
from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator import load_config
from orchestrator.errors import ConfigError
from orchestrator.engine.replay import balanced_order, memory_count, select_exemplars


def test_select_exemplars_per_class():
    positions = np.repeat(np.arange(4), [30, 30, 5, 30])  # class 2 has fewer samples than the quota
    indices = np.arange(len(positions))
    picked = select_exemplars(indices, positions, range(1, 4), 20, np.random.default_rng(0))
    assert np.bincount(positions[picked], minlength=4).tolist() == [0, 20, 5, 20]
    assert len(np.unique(picked)) == len(picked)  # without replacement
    again = select_exemplars(indices, positions, range(1, 4), 20, np.random.default_rng(0))
    assert np.array_equal(picked, again)


def test_balanced_batches_are_half_memory_half_new():
    new, memory = np.arange(100, 400), np.arange(0, 60)
    order = balanced_order(new, memory, batch_size=16, memory_share=0.5, seed=[0, 1])
    assert len(order) == (300 + 60) // 16 * 16  # batches per epoch = ⌊(|new| + |memory|) / batch⌋
    for batch in order.reshape(-1, 16):
        assert (batch < 100).sum() == 8 and (batch >= 100).sum() == 8
        assert len(np.unique(batch[:8])) == 8 and len(np.unique(batch[8:])) == 8  # pools larger than their share
    assert np.array_equal(order, balanced_order(new, memory, 16, 0.5, seed=[0, 1]))


def test_small_pool_is_drawn_with_replacement():
    order = balanced_order(np.arange(10, 200), np.arange(3), batch_size=16, memory_share=0.5, seed=[2])
    batch = order[:16]
    assert set(batch[:8]) <= {0, 1, 2}


def test_a_pool_the_size_of_its_share_is_drawn_with_replacement():
    """The reference sampler draws with replacement when a pool holds <= its share: a memory of exactly 8
    samples for 8 memory slots is not served as the same 8 samples, permuted, in every batch."""
    order = balanced_order(np.arange(100, 400), np.arange(8), batch_size=16, memory_share=0.5, seed=[4])
    memory_parts = order.reshape(-1, 16)[:, :8]
    assert all(set(part) <= set(range(8)) for part in memory_parts)
    assert any(len(np.unique(part)) < 8 for part in memory_parts)  # repeats: drawn with replacement
    new_parts = order.reshape(-1, 16)[:, 8:]
    assert all(len(np.unique(part)) == 8 for part in new_parts)  # a larger pool: without replacement


def test_ranks_split_the_same_global_batches():
    new, memory = np.arange(100, 400), np.arange(0, 60)
    shards = [balanced_order(new, memory, 8, 0.5, seed=[3], rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == (300 + 60) // 16 * 8  # equal step counts for DDP
    for a, b in zip(shards[0].reshape(-1, 8), shards[1].reshape(-1, 8)):
        assert (a < 100).sum() == (b < 100).sum() == 4


def test_memory_count_keeps_both_kinds():
    assert memory_count(128, 0.5) == 64 and memory_count(2, 0.1) == 1 and memory_count(4, 0.99) == 3


def test_replay_config_errors():
    with pytest.raises(ConfigError, match="scenario.replay"):
        load_config(None, ["scenario.replay={per_class: 5}"])  # quickstart trains on cumulative data
    with pytest.raises(ConfigError, match="scenario.replay.batch_share"):
        load_config(None, ["scenario.training_data=new", "scenario.replay={batch_share: 1.0}"])


@register
class BatchRecorder(ExperienceReplay):
    """Records the class positions of every training batch of every step."""

    name = "test_batch_recorder"
    batches: list = []

    def loss(self, outputs, images, labels, state, ctx):
        if outputs["logits"].requires_grad:
            BatchRecorder.batches.append((ctx.index, ctx.num_previous, labels.tolist()))
        return super().loss(outputs, images, labels, state, ctx)


def test_replay_inside_a_run(tmp_path):
    cfg = load_config(None, [
        "data.num_classes=6", "data.train_per_class=30", "data.test_per_class=4", "data.image_size=16",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "scenario.training_data=new", "scenario.event=finetune", "scenario.replay={per_class: 10}",
        "model.width=8", "training.epochs=1", "training.incremental={}", "training.batch_size=8", "resources.num_workers=0",
        "methods=[{name: test_batch_recorder}]",
    ])
    cfg.output_dir = str(tmp_path)
    BatchRecorder.batches.clear()
    driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    run_dir = tmp_path / cfg.name
    for step, classes in ((0, 2), (1, 4), (2, 6)):
        memory = np.array(runfiles.storage(run_dir).read_json(runfiles.replay_key("test_batch_recorder", step))["indices"])
        labels = np.repeat(np.arange(6), 30)[memory]  # natural class order: position = label
        assert np.bincount(labels, minlength=6).tolist() == [10] * classes + [0] * (6 - classes)
    step0 = [b for b in BatchRecorder.batches if b[0] == 0]
    assert len(step0) == 60 // 8  # an ordinary shuffled epoch, ragged batch dropped
    for step, previous in ((1, 2), (2, 4)):
        batches = [labels for s, _, labels in BatchRecorder.batches if s == step]
        assert len(batches) == (60 + 10 * previous) // 8
        for labels in batches:  # four old classes from the memory, four of the step's new classes
            assert sum(y < previous for y in labels) == 4 and sum(y >= previous for y in labels) == 4
    entry = runfiles.manifest_entry(run_dir, "test_batch_recorder", 2)
    assert entry["replay_samples"] == 40 and entry["train_samples"] == 60
