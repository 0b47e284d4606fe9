"""A real local Ray cluster: a 3-step simulation with one step on 2 DDP workers, its matrix rows as Ray
tasks (bitwise the driver's), then resume."""

import json

import numpy as np
import pytest

from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator.engine import executor
from orchestrator import load_config
from orchestrator.storage.run_storage import RunStorage
from orchestrator.storage.store import EmbeddingStore
from orchestrator.storage.verify import verify_run

pytestmark = pytest.mark.integration


def test_three_steps_on_ray_with_two_workers_then_resume(ray_cluster, tmp_path, monkeypatch):
    cfg = load_config(None, [
        "data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "model.width=8", "model.embedding_dim=16", "training.epochs=2", "training.incremental={}", "training.batch_size=16",
        "resources.num_workers=1", "resources.steps={2: {num_workers: 2}}",
        "methods=[{name: bct}]",
    ])
    cfg.output_dir = str(tmp_path)
    run_dir = tmp_path / cfg.name
    import orchestrator.evaluation as evaluation

    in_driver = evaluation.compatibility_row
    with monkeypatch.context() as patch:  # every version trained on Ray: its row is a Ray task, never the driver's
        patch.setattr(evaluation, "compatibility_row", lambda *a, **k: pytest.fail("a row was computed in the driver"))
        metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert evaluation.compatibility_row is in_driver
    row_files = [run_dir / runfiles.row_key("bct", v) for v in range(3)]
    from_tasks = [path.read_bytes() for path in row_files]
    for path in row_files:
        path.unlink()
    driver.ensure_row(cfg, run_dir, "bct", 2, 6)  # the same rows computed in the driver: the same bits
    assert [path.read_bytes() for path in row_files] == from_tasks

    # two worker groups: steps 0-1 on one worker, step 2 on two DDP workers
    groups = [runfiles.manifest_entry(run_dir, "bct", v)["group"] for v in range(3)]
    assert groups[0] == groups[1] != groups[2]
    assert sorted(p.name for p in (run_dir / "ray").iterdir() if p.is_dir()) == [f"quickstart-{g}" for g in groups[1:]]
    assert runfiles.manifest_entry(run_dir, "bct", 2)["world_size"] == 2
    recorded = runfiles.manifest_entry(run_dir, "bct", 2)["artefacts"]  # the chief vouches for both ranks' shards
    assert sorted(k.rsplit("/", 1)[1] for k in recorded if runfiles.is_store_key(k)) == ["_COMPLETE.json", "part-0.arrow", "part-1.arrow"]
    assert verify_run(RunStorage.at(run_dir), digests=True).ok
    store = EmbeddingStore(run_dir / "store")
    table = store.read("bct", 2, "test")
    assert table.embeddings.shape == (6 * 8, 16) and (np.diff(table.sample_ids) > 0).all()
    assert np.allclose(np.linalg.norm(table.embeddings, axis=1), 1, atol=1e-5)
    m = np.array(metrics["methods"]["bct"]["matrices"]["cmc1"], dtype=float)
    assert np.isnan(m[0, 1]) and np.isfinite(np.tril(m)).all()

    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    again = driver.run_experiment(driver.load_run_config(run_dir), run_dir, progress=False, echo=lambda s: None)
    assert json.dumps(again["methods"]) == json.dumps(metrics["methods"])


def test_a_row_task_reads_nothing_but_the_run_storage(ray_cluster, tmp_path):
    """A row task where the training data cannot be read (an image folder on the driver's disk, moved
    away): the driver's class count is all it needs, and its row is bitwise the driver's."""
    import ray
    from PIL import Image

    from orchestrator.engine.rows import _remote_row

    data = tmp_path / "folder"
    for split, per_class in (("train", 4), ("test", 2)):
        for c in range(4):
            (data / split / f"cls{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (60 * c, 200 - 50 * c, 40 * i)).save(data / split / f"cls{c}" / f"{i}.png")
    cfg = load_config(None, [
        "data.dataset=imagefolder", f"data.root={data}", "data.image_size=8",
        "scenario.initial_classes=2", "scenario.increment=1", "scenario.num_steps=2", "scenario.class_order=seeded",
        "model.width=8", "model.embedding_dim=8", "training.epochs=1", "training.incremental={}", "training.batch_size=8",
        "resources.num_workers=0", "methods=[{name: bct}]",
    ])
    cfg.output_dir = str(tmp_path)
    driver.run_experiment(cfg, progress=False, echo=lambda s: None)  # in-process: the rows are the driver's
    run_dir = tmp_path / cfg.name
    row_files = [run_dir / runfiles.row_key("bct", v) for v in range(2)]
    in_driver = [path.read_bytes() for path in row_files]
    assert "none" in json.loads((run_dir / "metrics.json").read_text())["methods"]["bct"]["cmc1_by_block"]["blocks"]
    data.rename(tmp_path / "moved")
    for path in row_files:
        path.unlink()
    ray.get(_remote_row().remote(cfg.to_dict(), RunStorage.at(run_dir), "bct", 1, 4))  # rows 0 and 1
    assert [path.read_bytes() for path in row_files] == in_driver
