"""The service section from a real embedding store to metrics and report.md (no training: vectors
written by hand, one method whose versions agree and one whose versions are unrelated)."""

from __future__ import annotations

import json

import numpy as np

from orchestrator.config import parse_config
from orchestrator.evaluation.mixed_gallery import service_metrics
from orchestrator.reporting.report import render_report
from orchestrator.storage.run_storage import RunStorage
from orchestrator.storage.store import EmbeddingStore


def test_service_metrics_from_the_store_and_its_report(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 8)
    centres = rng.normal(size=(6, 12))
    store = EmbeddingStore(RunStorage.of(str(tmp_path / "store")))
    for version in range(3):
        shared = centres[labels] + 0.1 * rng.normal(size=(48, 12))
        rotation = np.linalg.qr(rng.normal(size=(12, 12)))[0]
        store.write("same", version, "test", shared, labels, np.arange(48))
        store.write("unrelated", version, "test", shared @ rotation, labels, np.arange(48))
    cfg = parse_config({"name": "svc", "methods": [{"name": "bct", "label": "same"}, {"name": "independent", "label": "unrelated"}],
                        "service": {"budgets": [0, 50, 100], "policies": ["random", "popular", "uncertainty"],
                                    "popularity": {"zipf": 1.2, "queries_per_step": 200}}})
    block_of_label = np.array([0, 0, 0, 1, 2, 2])  # classes 3 and then 4-5 arrive with steps 1 and 2
    written = {}
    service = service_metrics(store, cfg, 3, block_of_label, on_served=lambda method, table: written.setdefault(method, table))
    # one bookkeeping table per method: 2 references + 3 policies x 3 budgets, 3 steps, 48 items
    assert sorted(written) == ["same", "unrelated"] and written["same"].num_rows == 11 * 3 * 48
    rows = [r for r in written["same"].to_pylist() if r["sample_id"] == 24]  # class 3: arrives at step 1
    assert {r["arrival_step"] for r in rows} == {1}
    assert {(r["policy"], r["step"], r["served_version"]) for r in rows if r["budget"] in (0, 100)} >= {
        ("no_backfill", 0, -1), ("no_backfill", 2, 1), ("full_backfill", 2, 2), ("random", 2, 2), ("popular", 2, 1)}
    same, unrelated = service["methods"]["same"], service["methods"]["unrelated"]
    assert same["gallery_items"] == 48
    for entry in (same, unrelated):
        full, none = entry["references"]["full_backfill"], entry["references"]["no_backfill"]
        assert [row["gallery"] for row in full] == [24, 32, 48] and full[0] == none[0]
        assert [p["budget"] for p in entry["policies"]["random"]["points"]] == [0, 50, 100]
        assert entry["policies"]["random"]["points"][-1]["mean"] == {
            name: np.mean([row[name] for row in full[1:]]) for name in ("cmc1", "cmc5", "map", "nfr")}
    # stale items at step 1: the 24 of step 0; at step 2: the 32 present before
    assert same["policies"]["uncertainty"]["points"][0]["passes_saved"] == 24 + 32
    # unrelated versions collapse without backfill; agreeing ones stay near full backfill
    assert unrelated["references"]["no_backfill"][2]["map"] < 0.6 < 0.9 < unrelated["references"]["full_backfill"][2]["map"]
    assert abs(same["references"]["no_backfill"][2]["map"] - same["references"]["full_backfill"][2]["map"]) < 0.05

    run = RunStorage.of(str(tmp_path / "run"))
    run.write_text("metrics.json", json.dumps({"experiment": "svc", "primary": "map", "methods": {}, "service": service}))
    render_report(run)
    report = run.read_bytes("report.md").decode()
    assert "## Service: mixed gallery and partial backfill" in report
    assert "![backfill curves](service_backfill.png)" in report and "| popular | 50 |" in report
    assert run.exists("service_mixed_gallery.png") and run.exists("service_backfill.png")
