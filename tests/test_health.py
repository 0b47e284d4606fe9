"""The per-version health check: new-class vs previous-class accuracy, self-test retrieval, warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.engine.driver import run_experiment
from orchestrator.evaluation.health import combine_health, version_health
from orchestrator.evaluation.metrics import new_classes_undertrained
from orchestrator.evaluation.seeds import aggregate
from orchestrator.reporting.report import format_summary_table, render_report

from helpers import config_under


@pytest.mark.parametrize("new, previous, ratio, expected", [
    (0.03, 0.99, 0.5, True),      # the bct version 1: 0.03 < 0.495
    (0.47, 0.99, 0.5, True),      # 0.47 < 0.495
    (0.50, 0.99, 0.5, False),     # 0.50 >= 0.495
    (0.49, 0.98, 0.5, False),     # exactly at the threshold is not flagged
    (0.10, 0.99, 0.0, None),      # ratio 0: the check is off
    (0.10, None, 0.5, None),      # version 0: no earlier classes
    (None, 0.90, 0.5, None),      # a step that added no class
])
def test_new_classes_undertrained_by_hand(new, previous, ratio, expected):
    assert new_classes_undertrained(new, previous, ratio) is expected


ENTRIES = [
    {"num_previous": 0, "num_seen": 10, "accuracy_previous_classes": None, "accuracy_new_classes": 0.9},
    {"num_previous": 10, "num_seen": 15, "accuracy_previous_classes": 0.99, "accuracy_new_classes": 0.03},
    {"num_previous": 15, "num_seen": 20, "accuracy_previous_classes": 0.80, "accuracy_new_classes": 0.60},
]
MATRICES = {"cmc1": [[0.8, None, None], [0.7, 0.85, None], [0.6, 0.7, 0.9]],
            "map": [[0.5, None, None], [0.4, 0.55, None], [0.3, 0.4, 0.65]]}


def test_version_health_table_and_warnings():
    health = version_health(ENTRIES, MATRICES, 0.5)
    assert health["min_new_class_ratio"] == 0.5
    rows = health["versions"]
    assert [r["new_classes"] for r in rows] == [10, 5, 5]
    assert [r["self_test"] for r in rows] == [{"cmc1": 0.8, "map": 0.5}, {"cmc1": 0.85, "map": 0.55},
                                              {"cmc1": 0.9, "map": 0.65}]
    assert [r["warning"] for r in rows] == [None, True, False]  # 0.60 >= 0.5 * 0.80 = 0.40
    assert health["warnings"] == ["version 1: top-1 on its 5 new classes 0.030, below 0.5 × 0.990 on the "
                                  "classes it knew before (under-trained?)"]
    assert version_health(ENTRIES, MATRICES, 0.8)["warnings"][1].startswith("version 2: top-1 on its 5 new "
                                                                            "classes 0.600, below 0.8 × 0.800")
    old_run = version_health([{}, {}], {"cmc1": [[0.5, None], [0.4, 0.6]]}, 0.5)  # entries without accuracies
    assert [r["warning"] for r in old_run["versions"]] == [None, None] and old_run["warnings"] == []


def test_health_over_seeds_flags_a_version_flagged_in_any_seed(tmp_path):
    fine = [dict(e) for e in ENTRIES]
    fine[1]["accuracy_new_classes"] = 0.75
    summary = {"AC": 0.0, "AM": 70.0, "BC": 0.0, "FC": 0.0, "ECC_every_pair": False}
    per_seed = [{"method": "bct", "num_versions": 3, "matrices": MATRICES,
                 "summary_by_metric": {"cmc1": summary, "map": summary},
                 "health": version_health(entries, MATRICES, 0.5)} for entries in (fine, ENTRIES)]
    cfg = config_under(tmp_path, "seeds=[3, 4]")
    metrics = [{"schema_version": 1, "primary": "cmc1", "protocol": "leave-one-out",
                "methods": {"bct": entry}} for entry in per_seed]
    combined = aggregate(cfg, metrics)["methods"]["bct"]["health"]
    rows = combined["versions"]
    assert rows[1]["accuracy_new_classes"] == pytest.approx((0.75 + 0.03) / 2)
    assert [r["warning"] for r in rows] == [None, True, False]
    assert [r["warning_seeds"] for r in rows] == [[], [4], []]
    assert combined["warnings"] == ["version 1: top-1 on its 5 new classes below 0.5 × that on the classes it "
                                    "knew before in seed 4 (means 0.390 and 0.990; under-trained?)"]
    direct = combine_health([s["health"] for s in per_seed], [3, 4], per_seed[0]["health"])
    assert direct["versions"][1]["warning_seeds"] == [4]


def test_ratio_outside_zero_one_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="evaluation.min_new_class_ratio"):
        config_under(tmp_path, "evaluation.min_new_class_ratio=1.5")


def test_an_undertrained_increment_shows_in_metrics_report_and_summary(tmp_path):
    """A tiny in-process run whose version 1 fine-tunes one epoch at a negligible learning rate: its new
    classes stay near chance while the base classes are learned, and every report says so."""
    cfg = config_under(
        tmp_path, "data.num_classes=4", "data.train_per_class=24", "data.test_per_class=8",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
        "model.width=8", "model.embedding_dim=16", "training.epochs=4",
        "training.incremental={epochs: 1, lr: 1.0e-7}", "training.batch_size=16", "resources.num_workers=0",
        "methods=[{name: independent}]")
    metrics = run_experiment(cfg, progress=False, echo=lambda _: None)
    run_dir = Path(cfg.output_dir) / cfg.name
    health = metrics["methods"]["independent"]["health"]
    v0, v1 = health["versions"]
    assert v0["accuracy_previous_classes"] is None and v0["warning"] is None
    assert v1["new_classes"] == 2 and v1["warning"] is True
    assert v1["accuracy_new_classes"] < 0.5 * v1["accuracy_previous_classes"]
    # the per-version split agrees with the overall accuracy (equal test images per class) and, for
    # version 1, with the FSCIL split (the first step's classes are exactly the ones known before)
    accuracy = metrics["methods"]["independent"]["accuracy"]
    assert accuracy[1] == pytest.approx((2 * v1["accuracy_previous_classes"] + 2 * v1["accuracy_new_classes"]) / 4)
    summary = metrics["methods"]["independent"]["accuracy_summary"]
    assert (summary["base"][1], summary["novel"][1]) == (v1["accuracy_previous_classes"], v1["accuracy_new_classes"])
    assert v0["accuracy_new_classes"] == accuracy[0]
    matrices = metrics["methods"]["independent"]["matrices"]
    assert v1["self_test"] == {name: matrix[1][1] for name, matrix in matrices.items()}
    assert health["warnings"] and health["warnings"][0].startswith("version 1: top-1 on its 2 new classes")

    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["methods"]["independent"]["health"] == health
    report = Path(render_report(run_dir)).read_text()
    assert "## Health of every version" in report
    assert f"- **Warning** `independent` {health['warnings'][0]}" in report
    assert "| independent | 1 | 2 |" in report and "**under-trained**" in report
    summary_lines = format_summary_table(stored).splitlines()
    assert summary_lines[-1] == f"WARNING independent {health['warnings'][0]}"
