"""Model replacement: planning, config checks, the upstream stage, and broken checkpoints failing early."""

import hashlib

import pytest
import torch

from methods.base import load_state_dict
from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator.cli import main
from orchestrator import load_config
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.engine.scenarios import plan_steps
from orchestrator.engine.upstream import check_replacements, upstream_config

from helpers import config_under

EVAL = "{dataset: synthetic, variant: 2, num_classes: 4, train_per_class: 8, test_per_class: 4, image_size: 16}"
TINY = [
    "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=4", "data.image_size=16",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
    "scenario.training_data=new", "scenario.event=finetune", "scenario.replay={per_class: 4}",
    "model.width=8", "training.epochs=1", "training.incremental={}", "training.batch_size=8", "training.label_smoothing=0.0",
    "resources.num_workers=0",
    "evaluation={protocol: query-gallery, query: queries, gallery: gallery, templates: true, "
    f"sets: {{queries: {{split: train, data: {EVAL}}}, gallery: {{split: test, data: {EVAL}}}}}}}",
    "methods=[{name: stationary, params: {num_classes: 16}}, {name: er}]",
]
UPSTREAM = [
    "upstream={data: {dataset: synthetic, variant: 1, num_classes: 6, train_per_class: 16, test_per_class: 4, "
    "image_size: 16}, classes: [4, 6]}",
    "scenario.replace_at=[2]", "scenario.replacements=[{upstream: 1}]",
]


def tiny(tmp_path, *extra):
    return config_under(tmp_path, *TINY, *extra)


@pytest.fixture(scope="module")
def replaced_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replace")
    cfg = tiny(tmp, *UPSTREAM)
    metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    return cfg, tmp / cfg.name, metrics


def params(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_state_dict(path).items() if "running_" not in k and "num_batches" not in k}


def distance(a: dict, b: dict, prefix: str) -> float:
    return sum(float((a[k] - b[k]).norm()) for k in a if k.startswith(prefix))


def test_replace_events_are_planned(tmp_path):
    steps = plan_steps(tiny(tmp_path, *UPSTREAM), 6)
    assert [s.event for s in steps] == ["train", "finetune", "replace"]
    steps = plan_steps(tiny(tmp_path, *UPSTREAM, "scenario.replace_at=[0, 2]",
                            "scenario.replacements=[{upstream: 0}, {upstream: 1}]"), 6)
    assert [s.event for s in steps] == ["replace", "finetune", "replace"]
    assert [s.event for s in plan_steps(tiny(tmp_path), 6)] == ["train", "finetune", "finetune"]


def test_the_version_at_a_replacement_step_is_the_replacement_fine_tuned(replaced_run):
    cfg, run_dir, _ = replaced_run
    for spec in cfg.methods:
        digest = upstream_config(cfg, spec, 1).digest()
        upstream_dir = runfiles.upstream_dir(run_dir, digest)
        upstream = runfiles.version_checkpoint(upstream_dir, spec.name, 0)
        versions = [runfiles.version_checkpoint(run_dir, spec.key, v) for v in range(3)]
        entries = [runfiles.manifest_entry(run_dir, spec.key, v) for v in range(3)]
        assert [e["init_checkpoint"] for e in entries] == [  # recorded relative to the run directory
            None, f"versions/{spec.key}/v0/model.pt", f"upstream/{digest}/versions/{spec.name}/v0/model.pt"]
        assert [e["event"] for e in entries] == ["train", "finetune", "replace"]
        v1, v2, up1 = params(versions[1]), params(versions[2]), params(upstream)
        # one short epoch moves the weights a little: v2 sits next to the replacement, far from v1
        assert distance(v2, up1, "backbone.") < 0.2 * distance(v2, v1, "backbone.")
        assert runfiles.manifest_entry(upstream_dir, spec.name, 0)["num_seen"] == 6  # trained on 6 upstream classes
    er_up1, er_v2 = params(upstream), params(versions[2])
    assert er_up1["classifier.weight"].shape == (6, 32) and er_v2["classifier.weight"].shape == (6, 32)
    # the replacement's classifier rows were re-initialised, not loaded: they moved further than the backbone
    assert float((er_v2["classifier.weight"] - er_up1["classifier.weight"]).norm()) > 0.5


def test_query_gallery_templates_on_an_unseen_variant(replaced_run):
    """Every cell, recomputed from the store in float64 numpy: queries of version i classified by the
    nearest L2-normalised class mean of version j's gallery embeddings (protocol (a), class-mean templates)."""
    import numpy as np

    from orchestrator.storage.store import EmbeddingStore

    _, run_dir, metrics = replaced_run
    assert metrics["protocol"] == "query-gallery"
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    for key, entry in metrics["methods"].items():
        matrix = entry["matrices"]["cmc1"]
        assert set(entry["matrices"]) == {"cmc1"}
        for i in range(3):
            for j in range(i + 1):
                queries, gallery = store.read(key, i, "queries"), store.read(key, j, "gallery")
                classes = np.unique(gallery.labels)
                means = np.stack([gallery.embeddings[gallery.labels == c].astype(np.float64).mean(0) for c in classes])
                templates = means / np.linalg.norm(means, axis=1, keepdims=True)
                predicted = classes[np.argmax(queries.embeddings.astype(np.float64) @ templates.T, axis=1)]
                assert matrix[i][j] == pytest.approx(float(np.mean(predicted == queries.labels)), abs=1e-12)
    assert (run_dir / "heatmaps.png").is_file()
    assert metrics["methods"]["stationary"]["params"]["feature_dim"] == 15


def test_upstream_models_are_trained_once(replaced_run, monkeypatch):
    from orchestrator.engine import driver
    from orchestrator.engine import executor

    cfg, run_dir, metrics = replaced_run
    assert {p.name for p in (run_dir / "upstream").iterdir()} == {upstream_config(cfg, s, 1).digest() for s in cfg.methods}
    for spec in cfg.methods:  # each upstream model is a run of its own, with its report
        sub = run_dir / "upstream" / upstream_config(cfg, spec, 1).digest()
        assert (sub / "report.md").is_file() and runfiles.step_done(sub, spec.name, 0)
    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("retrained"))
    again = driver.run_experiment(cfg, run_dir, progress=False, echo=lambda s: None)
    assert again["methods"] == metrics["methods"]


def test_replacement_config_errors(tmp_path):
    cases = [
        (["scenario.replace_at=[1]"], "scenario.replacements"),
        (["scenario.replace_at=[3]", "scenario.replacements=[{checkpoint: x.pt}]"], "scenario.replace_at"),
        (["scenario.replace_at=[2, 1]", "scenario.replacements=[{upstream: 0}, {upstream: 0}]"], "scenario.replace_at"),
        (["scenario.replace_at=[1]", "scenario.replacements=[{upstream: 0}]"], "scenario.replacements.0.upstream"),
        (["scenario.replace_at=[1]", "scenario.replacements=[{upstream: 0, checkpoint: x.pt}]"], "scenario.replacements.0"),
        ([*UPSTREAM, "scenario.replacements=[{upstream: 2}]"], "scenario.replacements.0.upstream"),
        ([*UPSTREAM, "upstream.classes=[4, 9]"], "upstream.classes"),
        ([*UPSTREAM, "upstream.training={epochs: 0}"], "upstream.training.epochs"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError) as err:
            tiny(tmp_path, *overrides)
        assert err.value.key == key, overrides


def checkpoint_run(tmp_path, path, *extra):
    cfg = tiny(tmp_path, "scenario.replace_at=[1]", f"scenario.replacements=[{{checkpoint: {path}}}]", *extra)
    return cfg, tmp_path / cfg.name


@pytest.mark.parametrize("content, message", [
    (b"truncated download", "cannot be loaded safely"),
    (None, "does not exist"),
])
def test_broken_replacement_fails_before_anything_is_written(tmp_path, content, message):
    path = tmp_path / "replacement.pt"
    if content is not None:
        path.write_bytes(content)
    cfg, run_dir = checkpoint_run(tmp_path, path)
    with pytest.raises(CheckpointError, match=message):
        driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert not run_dir.exists()


def test_ill_fitting_replacement_names_the_tensor(tmp_path, capsys):
    from methods.base import create_method

    other = create_method("stationary", {"num_classes": 32}, load_config(None, TINY).model)  # another K
    cfg, run_dir = checkpoint_run(tmp_path, tmp_path / "other.pt")
    torch.save(other.build_model(plan_context(cfg)).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"step 1 for method 'stationary'.*head.junction.weight.*shape"):
        driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert not run_dir.exists()
    args = ["run", "--output-dir", str(tmp_path), *sum((["--set", o] for o in [
        *TINY, "scenario.replace_at=[1]", f"scenario.replacements=[{{checkpoint: {tmp_path / 'other.pt'}}}]"]), [])]
    assert main(args) == 2
    assert "head.junction.weight" in capsys.readouterr().err and not run_dir.exists()


def plan_context(cfg):
    from methods.base import StepContext

    return StepContext(index=0, num_steps=3, num_seen=2, num_previous=0, event="train", model=cfg.model,
                       training=cfg.training, seed=0)


def test_pinned_digest_and_absolute_paths(tmp_path, monkeypatch):
    from methods.base import create_method

    cfg = tiny(tmp_path)
    state = create_method("er", {}, cfg.model).build_model(plan_context(cfg)).state_dict()
    torch.save(state, tmp_path / "er.pt")
    digest = hashlib.sha256((tmp_path / "er.pt").read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    pinned = tiny(tmp_path, "methods=[{name: er}]", "scenario.replace_at=[1]",
                  f"scenario.replacements=[{{checkpoint: er.pt, sha256: '{digest}'}}]")
    assert pinned.scenario.replacements[0].checkpoint == str((tmp_path / "er.pt").resolve())  # resolved where it was read
    check_replacements(pinned)
    wrong = tiny(tmp_path, "methods=[{name: er}]", "scenario.replace_at=[1]",
                 f"scenario.replacements=[{{checkpoint: er.pt, sha256: '{'0' * 64}'}}]")
    with pytest.raises(CheckpointError, match="SHA-256"):
        check_replacements(wrong)
