import numpy as np
import pytest

from orchestrator import load_config
from orchestrator.engine.scenarios import Resources, class_order, plan_steps, train_indices


def test_class_incremental_plan():
    cfg = load_config(None, ["scenario.event=train"])
    steps = plan_steps(cfg, 20)
    assert [(s.num_previous, s.num_seen, s.train_from, s.event) for s in steps] == [
        (0, 10, 0, "train"), (10, 15, 0, "train"), (15, 20, 0, "train")]
    assert [s.event for s in plan_steps(load_config(None), 20)] == ["train", "finetune", "finetune"]


def test_new_only_finetune_plan_and_default_step_count():
    cfg = load_config(None, ["scenario.num_steps=null", "scenario.training_data=new", "scenario.event=finetune",
                             "scenario.increment=2"])
    steps = plan_steps(cfg, 20)
    assert len(steps) == 6  # 10 + 5*2 = 20
    assert steps[2].train_from == 12 and steps[2].event == "finetune"


def test_seeded_class_order_is_a_deterministic_permutation():
    cfg = load_config(None, ["scenario.class_order=seeded"])
    a, b = class_order(cfg, 20), class_order(cfg, 20)
    assert (a == b).all() and sorted(a) == list(range(20)) and not (a == np.arange(20)).all()
    assert (class_order(load_config(None), 20) == np.arange(20)).all()


def test_per_step_resources():
    cfg = load_config(None, ["resources.steps={2: {num_workers: 2}}"])
    steps = plan_steps(cfg, 20)
    assert [s.resources for s in steps] == [Resources(1, False, 1.0)] * 2 + [Resources(2, False, 1.0)]


def test_few_shot_indices_are_k_per_new_class_and_deterministic():
    cfg = load_config(None, ["scenario.kind=few-shot", "scenario.shots=5", "scenario.training_data=new"])
    steps = plan_steps(cfg, 20)
    positions = np.repeat(np.arange(20), 30)
    base = train_indices(positions, steps[0], seed=0)
    assert len(base) == 10 * 30  # the base session uses all its data
    a = train_indices(positions, steps[1], seed=0)
    assert len(a) == 25 and (np.bincount(positions[a], minlength=20)[10:15] == 5).all()
    assert (a == train_indices(positions, steps[1], seed=0)).all()
    assert not (a == train_indices(positions, steps[1], seed=1)).all()


def test_few_shot_needs_enough_images():
    from orchestrator.errors import DataError

    cfg = load_config(None, ["scenario.kind=few-shot", "scenario.shots=50"])
    steps = plan_steps(cfg, 20)
    with pytest.raises(DataError, match="shots=50"):
        train_indices(np.repeat(np.arange(20), 30), steps[1], seed=0)
