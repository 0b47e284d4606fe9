"""The service simulation on hand-made cases: per-item version bookkeeping, backfill policies, mixed
galleries and their curves (numpy only; the run-level path is in test_service_run.py)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.config import parse_config
from orchestrator.errors import ConfigError
from orchestrator.evaluation import backfill
from orchestrator.evaluation.backfill import NOT_PRESENT, simulate
from orchestrator.evaluation.mixed_gallery import (MixedGalleryEvaluator, StoredVersions, curve_area,
                                                   served_versions_table, service_results)
from orchestrator.storage import runfiles


def constant(keys):
    return lambda step, served: np.asarray(keys, dtype=np.float64)


# -- bookkeeping ------------------------------------------------------------------------------------------
def test_an_item_keeps_the_version_of_its_arrival_until_backfilled():
    arrival = np.array([0, 0, 2, 2, 4, NOT_PRESENT])
    history = simulate(arrival, 6, 0.0, constant(np.zeros(6)))
    assert history.served[:, 2].tolist() == [NOT_PRESENT, NOT_PRESENT, 2, 2, 2, 2]
    assert history.served[5].tolist() == [0, 0, 2, 2, 4, NOT_PRESENT]
    assert history.backfilled.tolist() == [0] * 6
    # stale items per upgrade: present and embedded by an older version
    assert history.stale.tolist() == [0, 2, 2, 4, 4, 5]
    assert history.backfill_fraction == 0 and history.passes_saved == 17

    full = simulate(arrival, 6, 100.0, constant(np.zeros(6)))
    assert full.served[5].tolist() == [5, 5, 5, 5, 5, NOT_PRESENT]
    assert full.backfilled.tolist() == full.stale.tolist() and full.backfill_fraction == 1


def test_an_item_left_out_of_every_backfill_keeps_its_version():
    arrival = np.array([0, 0, 0, 0, 2])
    # 50 % of 4 or 5 items = 2 per upgrade, and items 0 and 1 come first in every upgrade's order
    history = simulate(arrival, 6, 50.0, constant([0, 1, 2, 3, 4]))
    assert history.served[:, 3].tolist() == [0, 0, 0, 0, 0, 0]
    assert history.served[:, 4].tolist() == [NOT_PRESENT, NOT_PRESENT, 2, 2, 2, 2]
    assert history.served[5].tolist() == [5, 5, 0, 0, 2]
    assert history.backfilled.tolist() == [0, 2, 2, 2, 2, 2]


def test_the_served_versions_table_written_and_read_back(tmp_path):
    import pyarrow.parquet as pq

    arrival = np.array([0, 0, 2, 2, 4, NOT_PRESENT])
    none = simulate(arrival, 6, 0.0, constant(np.zeros(6)))
    full = simulate(arrival, 6, 100.0, constant(np.zeros(6)))
    table = served_versions_table(np.arange(100, 106), np.array([7, 7, 8, 8, 9, 9]), arrival,
                                  [("no_backfill", 0.0, none), ("full_backfill", 100.0, full)])
    runfiles.write_served_versions(str(tmp_path), "bct", table)
    back = pq.read_table(tmp_path / "service" / "bct" / "served_versions.parquet")
    assert back.equals(runfiles.read_served_versions(str(tmp_path), "bct"))
    assert back.num_rows == 2 * 6 * 6 and back.column_names == [
        "sample_id", "label", "arrival_step", "policy", "budget", "step", "served_version"]
    rows = back.to_pylist()

    def served(sample_id, policy, step):
        [row] = [r for r in rows if (r["sample_id"], r["policy"], r["step"]) == (sample_id, policy, step)]
        return row["served_version"]

    # item 102 arrives at step 2: absent before, version 2 from then on unless backfilled
    assert [served(102, "no_backfill", t) for t in range(6)] == [-1, -1, 2, 2, 2, 2]
    assert [served(102, "full_backfill", t) for t in range(6)] == [-1, -1, 2, 3, 4, 5]
    assert [served(105, "full_backfill", t) for t in range(6)] == [-1] * 6  # never arrives
    assert {(r["sample_id"], r["label"], r["arrival_step"], r["budget"]) for r in rows if r["step"] == 5} == {
        (100 + k, [7, 7, 8, 8, 9, 9][k], int(arrival[k]), budget) for k in range(6) for budget in (0.0, 100.0)}


def test_budget_counts_and_bad_budgets():
    assert [backfill.budget_items(b, 30) for b in (0, 10, 33.4, 100)] == [0, 3, 10, 30]
    assert backfill.budget_items(70, 10) == 7  # no float rounding below the exact product
    with pytest.raises(ValueError, match="percentage"):
        backfill.budget_items(101, 10)


def test_arrivals_follow_the_classes_and_the_rate():
    first = np.array([0, 0, 1, 1, 2, 3])
    assert backfill.arrival_steps(first, 3, 1.0, np.random.default_rng(0)).tolist() == [0, 0, 1, 1, 2, NOT_PRESENT]
    late = backfill.arrival_steps(np.zeros(2000, dtype=int), 50, 0.25, np.random.default_rng(0))
    assert late.min() == 0 and abs(np.mean(late == 0) - 0.25) < 0.04  # the first chance hits a quarter


# -- each policy selects exactly the budget, and the right items ----------------------------------------------
def chosen(priority, served_before, step=1, budget=50.0):
    """Items a policy re-embeds at ``step`` when ``served_before`` was the gallery before it."""
    arrival = np.where(served_before == NOT_PRESENT, NOT_PRESENT, 0)

    def fixed(t, served):
        return priority(step, served_before)

    history = simulate(arrival, 2, budget, fixed)  # one upgrade, from the given state
    return set(np.flatnonzero(history.served[1] == 1)), history.backfilled[1]


def test_oldest_first_takes_the_lowest_versions_then_the_earliest_arrivals():
    arrival = np.array([1, 0, 0, 1, 0, 1])
    served = np.array([1, 1, 0, 1, 0, 1])
    keys = backfill.oldest_priority(arrival)(2, served)
    order = np.lexsort((np.arange(6), keys))
    assert order.tolist() == [2, 4, 1, 0, 3, 5]  # version 0 first, then version 1 by arrival, then index
    assert chosen(backfill.oldest_priority(arrival), served) == ({2, 4, 1}, 3)


def test_policies_choose_the_expected_items():
    served = np.zeros(8, dtype=np.int64)
    counts = np.array([[0, 5, 1, 9, 0, 2, 2, 7]])
    assert chosen(backfill.popular_priority(counts), served) == ({3, 7, 1, 5}, 4)  # 5 and 6 tie: lower index
    disagreement = np.array([0.1, 0.9, 0.3, 0.0, 0.8, 0.2, 0.5, 0.4])
    assert chosen(backfill.uncertainty_priority(lambda t, s: disagreement), served, budget=25.0) == ({1, 4}, 2)
    rng_order = np.random.default_rng([7, backfill.RANDOM_ORDER, 1]).permutation(8)
    assert chosen(backfill.random_priority(7), served, budget=37.5) == (set(rng_order[:3]), 3)


def test_class_balanced_spreads_the_budget_over_classes():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    served = np.zeros(10, dtype=np.int64)
    priority = backfill.class_balanced_priority(labels, seed=3)
    for budget, per_class in ((30.0, [1, 1, 1]), (60.0, [2, 2, 2]), (80.0, [3, 2, 3]), (100.0, [4, 2, 4])):
        items, count = chosen(priority, served, budget=budget)
        assert count == len(items) == int(budget / 10)
        assert np.bincount(labels[list(items)], minlength=3).tolist() == per_class
    # only stale items count: with class 1 up to date the budget goes to classes 0 and 2
    served_fresh = np.array([0, 0, 0, 0, 2, 2, 0, 0, 0, 0])
    items, count = chosen(priority, served_fresh, budget=40.0)
    assert count == 4 and np.bincount(labels[list(items)], minlength=3).tolist() == [2, 0, 2]


def test_zipf_query_log_prefers_the_popular_items_among_those_present():
    present = np.array([[True] * 50 + [False] * 50, [True] * 100])
    counts = backfill.zipf_query_counts(present, 1.5, 5000, np.random.default_rng(0))
    assert counts.sum(axis=1).tolist() == [5000, 5000] and counts[0, 50:].sum() == 0
    assert counts[1].max() > 20 * np.median(counts[1])  # heavy head


def test_backfill_grows_monotonically_with_the_budget():
    rng = np.random.default_rng(0)
    arrival = rng.integers(0, 4, 60)
    labels = rng.integers(0, 5, 60)
    budgets = [0, 10, 25, 50, 75, 100]
    for policy in ("random", "class-balanced", "oldest"):
        priority = backfill.priority_for(policy, arrival=arrival, labels=labels, seed=1)
        histories = [simulate(arrival, 4, b, priority) for b in budgets]
        fractions = [h.backfill_fraction for h in histories]
        assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
        if policy != "oldest":  # a fixed order per step: every item is at least as new under a larger budget
            for smaller, larger in zip(histories, histories[1:]):
                assert (larger.served >= smaller.served).all()


def test_policies_need_their_data():
    with pytest.raises(ValueError, match="query log"):
        backfill.priority_for("popular", arrival=np.zeros(2), labels=np.zeros(2), seed=0)


# -- configuration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, key", [({"budgets": [0, 50, 100.5]}, "service.budgets.2"),
                                          ({"budgets": [-1]}, "service.budgets.0"),
                                          ({"policies": ["random", "popular"]}, "service.policies"),
                                          ({"arrival_rate": 1.5}, "service.arrival_rate")])
def test_bad_service_sections_name_their_key(section, key):
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "x", "service": section})
    assert info.value.key == key


# -- mixed galleries --------------------------------------------------------------------------------------
def two_version_gallery(leave_one_out=True):
    """Four items of two classes. Version 0 mapped class 0 to +x and class 1 to +y; version 1 maps them
    to -y and +x (an incompatible upgrade: v1's class-0 queries land on v0's class-1 items)."""
    labels = np.array([0, 0, 1, 1])
    v0 = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    v1 = np.array([[0, -1], [0.1, -1], [1, 0], [1, 0.1]], dtype=np.float32)
    return StoredVersions([v0, v1], [v0, v1], labels, labels, leave_one_out)


def test_mixed_gallery_scores_and_negative_flips_by_hand():
    evaluator = MixedGalleryEvaluator(two_version_gallery())
    arrival = np.zeros(4, dtype=np.int64)
    # class 0 backfilled (half the gallery) in the third history
    none, full, half = evaluator.histories([simulate(arrival, 2, budget, constant([0, 0, 1, 1]))
                                            for budget in (0.0, 100.0, 50.0)])
    assert none[0]["cmc1"] == full[0]["cmc1"] == 1.0 and none[0]["nfr"] is None
    # no backfill at step 1 (v1 queries, v0 gallery), similarities to the other three items:
    # q0 (0,-1): item 1 -0.0995, item 2 -1, item 3 -0.995 -> item 1 (class 0) first
    # q1 (.1,-1): item 0 0.0995, item 2 -0.995, item 3 -0.98 -> item 0 (class 0) first
    # q2 (1,0): item 0 1, item 1 0.995, item 3 0.0995 -> its class-1 item at rank 3
    # q3 (1,.1): item 0 0.995, item 1 1, item 2 0.0995 -> rank 3
    assert none[1]["cmc1"] == 0.5 and none[1]["cmc5"] == 1.0
    assert none[1]["map"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 3) / 4)
    assert none[1]["nfr"] == 0.5  # q2 and q3 were right at step 0 and are wrong now
    assert full[1] == {"cmc1": 1.0, "cmc5": 1.0, "map": 1.0, "nfr": 0.0, "gallery": 4, "backfilled": 4}
    # class 0 backfilled: q2 (1,0) sees item 1 (v1) and item 3 (v0) at the same similarity 0.1/|(.1,1)|;
    # the tie goes to the lower index, item 1 of the other class: rank 2
    assert half[1]["cmc1"] == 0.75 and half[1]["map"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert half[1]["nfr"] == 0.25 and half[1]["backfilled"] == 2
    assert evaluator.rankings == 4  # step 0 is one selection for all three histories


def test_curves_are_monotone_where_the_old_vectors_are_useless():
    """Old vectors carry no class information, new ones separate the classes perfectly: every item
    backfilled can only help, so quality rises with the budget for every policy."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 10)
    centres = rng.normal(size=(6, 16))
    new = (centres[labels] + 0.05 * rng.normal(size=(60, 16))).astype(np.float32)
    old = rng.normal(size=(60, 16)).astype(np.float32)
    versions = StoredVersions([old, new], [old, new], labels, labels, leave_one_out=True)
    from orchestrator.config import ServiceConfig

    service = ServiceConfig(budgets=[0, 20, 40, 60, 80, 100], policies=["random", "oldest", "class-balanced"])
    out = service_results(versions, np.zeros(60, dtype=np.int64), 2, service, seed=0)
    full = out["references"]["full_backfill"][1]["map"]
    assert out["references"]["no_backfill"][1]["map"] < 0.3 < 0.99 < full
    for policy, entry in out["policies"].items():
        values = [p["mean"]["map"] for p in entry["points"]]
        assert values == sorted(values), policy
        assert values[-1] == full and entry["points"][0]["passes_saved"] == 60
        assert entry["area"]["map"] == pytest.approx(curve_area([p["backfill_fraction"] for p in entry["points"]], values))


def test_curve_area_is_the_trapezoid_rule():
    assert curve_area([0, 0.5, 1], [0.2, 0.6, 1.0]) == pytest.approx(0.6)
    assert curve_area([0, 1], [None, 1.0]) is None


def test_a_service_needs_items_ranked_one_by_one_and_an_upgrade():
    from orchestrator.engine.validate import parse_experiment

    templates = {"protocol": "query-gallery", "gallery": "g", "templates": True,
                 "sets": {"test": {}, "g": {"split": "train"}}}
    for data, key in (({"evaluation": templates}, "service"),
                      ({"evaluation": {"sets": {"test": {"classes": "seen"}}}}, "service"),
                      ({"scenario": {"num_steps": 1}}, "service")):
        with pytest.raises(ConfigError) as info:
            parse_experiment({"name": "x", "service": {}, **data})
        assert info.value.key == key
