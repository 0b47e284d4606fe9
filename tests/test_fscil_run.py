"""An offline FSCIL experiment end to end, in-process: upstream CLIP, zero-shot baseline, CPE-CLIP sessions."""

import json
from pathlib import Path

import pytest
import torch

from orchestrator.evaluation import metrics as M
from orchestrator.engine import driver
from orchestrator import load_config

FSCIL = [
    "data.num_classes=8", "data.train_per_class=12", "data.test_per_class=4", "data.augment=false",
    "scenario.kind=few-shot", "scenario.initial_classes=4", "scenario.increment=2", "scenario.shots=2",
    "scenario.num_steps=3", "scenario.training_data=new", "scenario.event=finetune",
    "model.name=tiny-vit-w32", "upstream_clip={images_per_class: 6, epochs: 1, batch_size: 16}",
    "training={optimizer: sgd, epochs: 2, batch_size: 20, lr_schedule: [0.01, 0.02], label_smoothing: 0.0, "
    "weight_decay: 0.00001, incremental: {batch_size: 3}}",
    "resources.num_workers=0", "methods=[{name: zero_shot_clip}, {name: cpe_clip}]",
]


@pytest.fixture(scope="module")
def fscil_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fscil")
    cfg = load_config(None, FSCIL)
    cfg.output_dir = str(tmp)
    metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    return tmp / cfg.name, metrics


def zero_shot_accuracy_with_open_clip(run_dir, num_seen):
    """Session accuracy of the zero-shot baseline computed without the project's model or transform code:
    open_clip's own encoders on the upstream weights, OpenAI mean/std by hand, "name." texts, top-1 over
    the seen classes on the test images of the seen classes (natural class order)."""
    import numpy as np
    import open_clip

    from methods.nets.clip_models import create_clip
    from orchestrator.config import DataConfig
    from orchestrator.data import load_split

    checkpoint = run_dir / json.loads((run_dir / "upstream_clip.json").read_text())["checkpoint"]  # relative to the run
    model, tokenizer = create_clip("tiny-vit-w32")
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    test = load_split(DataConfig(num_classes=8, train_per_class=12, test_per_class=4, augment=False), "test")
    keep = test.labels < num_seen
    mean, std = np.array(open_clip.OPENAI_DATASET_MEAN), np.array(open_clip.OPENAI_DATASET_STD)
    pixels = (test.images[keep] / 255.0 - mean) / std
    with torch.no_grad():
        images = model.encode_image(torch.tensor(pixels, dtype=torch.float32).permute(0, 3, 1, 2))
        texts = model.encode_text(tokenizer([f"{name}." for name in test.class_names[:num_seen]]))
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    return float((scores.argmax(1).numpy() == test.labels[keep]).mean())


def test_every_session_reports_accuracy_avg_pd_and_base_vs_novel(fscil_run):
    run_dir, metrics = fscil_run
    zero_shot = metrics["methods"]["zero_shot_clip"]["accuracy"]
    assert zero_shot == pytest.approx([zero_shot_accuracy_with_open_clip(run_dir, n) for n in (4, 6, 8)], abs=1e-9)
    for key in ("zero_shot_clip", "cpe_clip"):
        entry = metrics["methods"][key]
        accuracy, summary = entry["accuracy"], entry["accuracy_summary"]
        assert len(accuracy) == 3 and all(0 <= a <= 1 for a in accuracy)
        assert summary["avg"] == pytest.approx(M.session_average(accuracy))
        assert summary["pd"] == pytest.approx(M.performance_drop(accuracy))
        assert summary["base"][0] == accuracy[0] and summary["novel"][0] is None
        assert all(v is not None for v in summary["novel"][1:])
        assert len(entry["matrices"]["cmc1"]) == 3  # the sessions' image embeddings went to the store
    assert metrics["methods"]["zero_shot_clip"]["trainable_parameters"] == 0
    assert metrics["methods"]["cpe_clip"]["trainable_parameters"] == 2 * 2 * 32 + 32 * 32 + 32
    report = (run_dir / "report.md").read_text()
    assert "Accuracy per session" in report and (run_dir / "accuracy.png").is_file()
    upstream = json.loads((run_dir / "upstream_clip.json").read_text())
    assert upstream["model"] == "tiny-vit-w32" and len(upstream["zero_shot_per_class"]) == 8


def test_prompts_carry_over_and_versions_hold_only_what_was_trained(fscil_run):
    run_dir, _ = fscil_run
    versions = [torch.load(run_dir / "versions" / "cpe_clip" / f"v{v}" / "model.pt", weights_only=True)
                for v in range(3)]
    assert all(set(state) == {"prompts", "projection.weight", "projection.bias"} for state in versions)
    assert not torch.equal(versions[0]["prompts"], versions[1]["prompts"])
    zero_shot = torch.load(run_dir / "versions" / "zero_shot_clip" / "v0" / "model.pt", weights_only=True)
    assert zero_shot == {}
    manifest = json.loads((run_dir / "manifest" / "cpe_clip" / "step-001.json").read_text())
    assert manifest["train_samples"] == 2 * 2  # 2-way 2-shot


def test_few_shot_sessions_train_on_every_sample_including_the_last_partial_batch(fscil_run):
    """Base session: 48 images in batches of 20 (20 + 20 + 8); sessions 1-2: 4 shots in batches of 3 (3 + 1).
    Every epoch sees every sample, as the reference's loader (no ragged batch dropped)."""
    run_dir, _ = fscil_run
    for step, samples in [(0, 4 * 12), (1, 2 * 2), (2, 2 * 2)]:
        manifest = json.loads((run_dir / "manifest" / "cpe_clip" / f"step-{step:03d}.json").read_text())
        assert manifest["train_samples"] == samples and manifest["trained_images_per_worker"] == 2 * samples


def test_report_table_shows_avg_and_pd_with_their_spread_over_seeds(tmp_path):
    from orchestrator.reporting.report import render_report

    summary = {"avg": 0.7, "pd": 0.2, "base": [0.8, 0.7], "novel": [None, 0.5]}
    (tmp_path / "metrics.json").write_text(json.dumps({
        "experiment": "x", "methods": {"cpe": {"accuracy": [0.8, 0.6], "accuracy_summary": summary,
                                               "trainable_parameters": 406272}},
        "methods_std": {"cpe": {"accuracy_summary": {"avg": 0.01, "pd": 0.02}}}, "seeds": {"values": [0, 1]}}))
    report = Path(render_report(tmp_path)).read_text()
    assert "| cpe | 80.00 | 60.00 | 70.00 ± 1.00 | 20.00 ± 2.00 | 70.00 | 50.00 | 406,272 |" in report


def test_a_frozen_clip_without_weights_is_the_same_network_in_every_version(tmp_path, monkeypatch):
    """No pretrained weights: each session re-seeds (seed·1000 + step), yet the frozen CLIP is built from one
    fixed seed, so every version of every method sees the same network and embeds the same images alike."""
    import numpy as np

    from methods.cpe_clip import ZeroShotClip
    from orchestrator.storage.store import EmbeddingStore

    built = []
    real_build = ZeroShotClip.build_model

    def recording_build(self, ctx):
        model = real_build(self, ctx)
        built.append((self.name, ctx.index, {k: v.clone() for k, v in model.clip.state_dict().items()}))
        return model

    monkeypatch.setattr(ZeroShotClip, "build_model", recording_build)
    cfg = load_config(None, [o for o in FSCIL if not o.startswith("upstream_clip")] + [f"output_dir={tmp_path}"])
    driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert {(name, index) for name, index, _ in built} == {(m, i) for m in ("zero_shot_clip", "cpe_clip") for i in range(3)}
    reference = built[0][2]
    for _, _, state in built:
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    store = EmbeddingStore(tmp_path / cfg.name / "store")
    embeddings = [store.read("zero_shot_clip", v, "test").embeddings for v in range(3)]
    assert all(np.array_equal(e, embeddings[0]) for e in embeddings[1:])


def test_open_clips_random_weights_warning_is_shown_once(caplog):
    import logging

    from methods.nets import clip_models

    clip_models._warned_random.discard("tiny-vit-w64")
    with caplog.at_level(logging.WARNING):
        clip_models.create_frozen_clip("tiny-vit-w64")
        clip_models.create_frozen_clip("tiny-vit-w64")
    warnings = [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert len(warnings) == 1 and "tiny-vit-w64" in warnings[0].getMessage()
