"""XBT and the cross-modal driver: loss formulas, stage 1 on known maps, and a tiny end-to-end run in-process
(the old model loaded once and never by a stage, the old gallery never re-encoded, resume, CLI, errors)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from methods.crossmodal_base import StageContext, TextPairs, create_crossmodal
from methods.xbt import Projection, symmetric_infonce, text_alignment_losses
from orchestrator.engine import crossmodal
from orchestrator.engine import crossmodal_steps
from orchestrator.engine import executor
from orchestrator.engine.graph import ENCODE, STAGE, plan
from orchestrator.cli import main
from orchestrator.config import TrainingConfig
from orchestrator.config.crossmodal import parse_crossmodal
from orchestrator.errors import ConfigError, DataError
from orchestrator.evaluation import cross_modal_recall

TINY = {
    "kind": "cross-modal", "name": "xbt_tiny", "seeds": [0, 1],
    "models": {"old": {"name": "tiny-vit-w32"}, "new": {"name": "tiny-vit-w64"}},
    "data": {"synthetic": {"num_classes": 4, "train_per_class": 8, "test_per_class": 4},
             "captions_per_image": 3, "pair_count": 16},
    "training": {"text": {"epochs": 2, "batch_size": 16}, "pairs": {"epochs": 1, "batch_size": 8}},
    "resources": {"num_workers": 0},
    "methods": [{"name": "procrustes"}, {"name": "xbt", "params": {"hidden": 16, "lora": {"rank": 2}}}],
}


def test_symmetric_infonce_matches_a_hand_computed_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = s * I: each row's cross-entropy is log(1 + e^-s), in both directions
    s = torch.tensor(3.0)
    torch.testing.assert_close(symmetric_infonce(a, a, s), torch.tensor(math.log(1 + math.exp(-3.0))))
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped partners: log(1 + e^s)
    torch.testing.assert_close(symmetric_infonce(a, b, s), torch.tensor(math.log(1 + math.exp(3.0))))


def test_text_alignment_losses_hand_computed():
    predicted = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    parts = text_alignment_losses(predicted, target, ["cosine", "mse"], torch.tensor(1.0))
    torch.testing.assert_close(parts["cosine"], torch.tensor(0.5))  # cosines 0 and 1
    torch.testing.assert_close(parts["mse"], torch.tensor(1.5))  # squared distances 2 and 1


def test_projection_shapes_and_residual_is_linear_plus_mlp():
    x = torch.randn(5, 12)
    for kind in ("linear", "mlp", "mlp_residual"):
        assert Projection(12, 7, kind, hidden=9)(x).shape == (5, 7)
    phi = Projection(12, 7, "mlp_residual", hidden=9)
    torch.testing.assert_close(phi(x), phi.linear(x) + phi.mlp(x))


def plain_train(module, num_items, loss_fn, epochs=300, lr=0.05):
    """A bare full-batch loop standing in for the engine's: here only XBT's stage-1 objective is tested."""
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    for epoch in range(epochs):
        loss, _ = loss_fn(module, torch.arange(num_items), epoch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("sigma", [0.0, 0.02])
def test_text_stage_learns_a_known_map_into_a_narrower_space(sigma):
    generator = torch.Generator().manual_seed(0)
    new = F.normalize(torch.randn(256, 16, generator=generator), dim=-1)
    mix = torch.randn(16, 8, generator=generator)
    old = F.normalize(new @ mix, dim=-1)
    method = create_crossmodal("xbt", {"projection": "linear", "noise_sigma": sigma, "text_loss": ["cosine"]})
    ctx = StageContext(stage="text", seed=0, new_dim=16, old_dim=8, device=torch.device("cpu"),
                       training=TrainingConfig(), train=plain_train)
    state = method.stages()["text"](TextPairs(new, old), {}, ctx)
    phi = method.projection(16, 8, state)
    with torch.no_grad():
        assert F.cosine_similarity(phi(new), old).mean() > 0.98


def test_params_are_validated_with_their_key():
    from orchestrator.engine.validate import parse_experiment

    with pytest.raises(ConfigError) as err:
        parse_experiment({**TINY, "methods": [{"name": "xbt", "params": {"lora": {"targets": ["x"]}}}]})
    assert err.value.key == "methods.0.params.lora.targets"
    with pytest.raises(ConfigError, match="unknown cross-modal method"):
        parse_experiment({**TINY, "methods": [{"name": "bct"}]})
    with pytest.raises(ConfigError) as err:
        parse_experiment({**TINY, "methods": [{"name": "xbt", "training": {"pairs": {"epochs": 0}}}]})
    assert err.value.key == "methods.0.training.pairs.epochs"
    with pytest.raises(ConfigError, match="reserved"):
        parse_experiment({**TINY, "methods": [{"name": "xbt", "label": "old"}]})


@pytest.mark.parametrize("params, key", [
    ({"projection": "linear", "hidden": 64}, "methods.0.params.hidden"),
    ({"text_stage": False, "consistency_weight": 0.5}, "methods.0.params.consistency_weight"),
    ({"pair_stage": False, "consistency_weight": 0.5}, "methods.0.params.consistency_weight"),
])
def test_options_that_would_do_nothing_are_config_errors(params, key):
    from orchestrator.engine.validate import parse_experiment

    with pytest.raises(ConfigError) as err:
        parse_experiment({**TINY, "methods": [{"name": "xbt", "params": params}]})
    assert err.value.key == key


def test_unset_hidden_and_consistency_resolve_to_their_defaults_where_they_apply():
    from methods.xbt import XBTParams

    assert XBTParams().resolved_hidden == 2048 and XBTParams().resolved_consistency_weight == 1.0
    assert XBTParams(text_stage=False).resolved_consistency_weight == 0.0
    assert XBTParams(consistency_weight=0.25).resolved_consistency_weight == 0.25


def test_recall_on_a_hand_made_case_with_several_captions_per_image():
    # 3 images, captions 0-1 of image 0, 2-4 of image 1, 5 of image 2 (2-d unit vectors by angle).
    def at(*degrees):
        r = np.radians(degrees)
        return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)

    images = at(0, 90, 180)
    captions = at(100, 10, 80, 200, 95, 170)
    caption_of = np.array([0, 0, 1, 1, 1, 2])
    scores = cross_modal_recall(images, captions, caption_of, captions, images, ks=(1, 2))
    # I2T: the nearest captions of images 0, 1, 2 are captions 1 (10°), 4 (95°) and 5 (170°): all their own.
    assert scores["i2t_r1"] == 1.0
    # T2I: caption 0 (100°) ranks images 1, 2, 0 (own image third); caption 3 (200°) ranks images 2, 1
    # (own image second); captions 1, 2, 4 and 5 find their image first.
    assert scores["t2i_r1"] == pytest.approx(4 / 6) and scores["t2i_r2"] == pytest.approx(5 / 6)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xbt")
    loads = []
    real = crossmodal_steps.create_clip

    def counting_create_clip(name, pretrained=None):
        loads.append(name)
        return real(name, pretrained)

    crossmodal_steps.create_clip = counting_create_clip
    try:
        cfg = parse_crossmodal(TINY)
        cfg.output_dir = str(tmp)
        metrics = crossmodal.run_crossmodal(cfg, echo=lambda s: None)
    finally:
        crossmodal_steps.create_clip = real
    return cfg, tmp / cfg.name, metrics, loads


def brute_force_recall(queries, gallery, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K by loops in float64: an image query hits when one of its own captions is among the K
    gallery captions most similar to it; a caption query hits when its image is among the K most similar
    gallery images (sorting by similarity, ties broken by gallery index)."""
    q_images, q_captions = (t.embeddings.astype(np.float64) for t in queries)
    g_images, g_captions = (t.embeddings.astype(np.float64) for t in gallery)
    caption_of = gallery[1].caption_of
    out = {}
    for k in ks:
        hits = [bool(set(np.argsort(-(g_captions @ q), kind="stable")[:k]) & set(np.flatnonzero(caption_of == i)))
                for i, q in enumerate(q_images)]
        out[f"i2t_r{k}"] = float(np.mean(hits))
    for k in ks:
        hits = [caption_of[c] in np.argsort(-(g_images @ q), kind="stable")[:k] for c, q in enumerate(q_captions)]
        out[f"t2i_r{k}"] = float(np.mean(hits))
    return out


def test_run_writes_the_full_table(finished_run):
    cfg, run_dir, metrics, _ = finished_run
    for name in ("config.yaml", "run.json", "metrics.json", "report.md", "recall.csv"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert metrics["metrics"] == names
    from orchestrator.storage import runfiles
    from orchestrator.storage.store import EmbeddingStore

    def sides(store, key, version):
        return store.read(key, version, "images"), store.read(key, version, "captions")

    store = EmbeddingStore(runfiles.store_dir(run_dir))
    old, new = sides(store, "old", 0), sides(store, "new", 1)
    old_old = brute_force_recall(old, old)
    assert metrics["old_old"] == pytest.approx(old_old, abs=1e-12)
    assert metrics["new_new"] == pytest.approx(brute_force_recall(new, new), abs=1e-12)
    for key in ("procrustes", "xbt"):
        entry = metrics["methods"][key]
        per_seed = {seed: brute_force_recall(sides(EmbeddingStore(run_dir / f"seed-{seed}" / "store"), key, 1), old)
                    for seed in (0, 1)}
        for seed, cells in per_seed.items():
            assert entry["per_seed"][str(seed)] == pytest.approx(cells, abs=1e-12)
        mean = {n: (per_seed[0][n] + per_seed[1][n]) / 2 for n in names}
        assert entry["compatible"] == {n: mean[n] > old_old[n] for n in names}  # ties fail
    assert metrics["methods"]["xbt"]["params"]["lora"]["rank"] == 2
    report = (run_dir / "report.md").read_text()
    assert "new→old xbt" in report and "old→old" in report and "T2I R@10" in report


def test_old_model_loaded_once_and_never_by_a_stage(finished_run):
    cfg, run_dir, _, loads = finished_run
    # encode-old loads the old model; encode-new and every stage step (2 seeds: procrustes 1 stage + its
    # query embedding, xbt 2 stages + query embedding) load only the new one.
    assert loads.count("tiny-vit-w32") == 1
    assert loads.count("tiny-vit-w64") == 1 + 2 * (1 + 1 + 1)
    tasks = plan(cfg).tasks
    stages = [t for t in tasks.values() if t.action == STAGE]
    assert len(stages) == 2 * 3 and [t.action for t in tasks.values()][:2] == [ENCODE, ENCODE]
    for task in stages:
        assert "tiny-vit-w32" not in json.dumps(task.payload), task.name  # the stage cannot even name it
        assert {"encode-old", "encode-new"} <= set(task.deps)
    assert tasks["seed-1/xbt/pairs"].deps[2:] == ("seed-1/xbt/text",)  # a method's stages in order


def test_old_gallery_is_stored_once_and_methods_store_only_queries(finished_run):
    _, run_dir, _, _ = finished_run
    shared = sorted(p.relative_to(run_dir / "store").parts[:3] for p in (run_dir / "store").rglob("part-0.arrow"))
    assert shared == [("method=new", "version=1", f"eval_set={s}") for s in ("captions", "corpus", "images")] + \
                     [("method=old", "version=0", f"eval_set={s}") for s in ("captions", "corpus", "images")]
    for seed in (0, 1):
        methods = {p.parts[-4] for p in (run_dir / f"seed-{seed}" / "store").rglob("part-0.arrow")}
        assert methods == {"method=procrustes", "method=xbt"}
    states = torch.load(run_dir / "seed-0" / "states" / "xbt" / "pairs.pt", weights_only=True)
    assert any(k.startswith("lora.") for k in states) and any(k.startswith("projection.") for k in states)


def test_rerun_and_cli_resume_redo_nothing(finished_run, monkeypatch, capsys):
    cfg, run_dir, metrics, _ = finished_run
    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    assert crossmodal.run_crossmodal(cfg, echo=lambda s: None)["methods"] == metrics["methods"]
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "new->old xbt" in capsys.readouterr().out
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()


def test_a_damaged_stage_state_and_a_changed_encoding_recompute_exactly_those(finished_run, tmp_path, capsys):
    """A stage's state is weights: that stage and the later stage of its method and seed are trained again.
    An encoding is embeddings: only it runs again, and no stage trained on the corpus is redone."""
    import json
    import shutil

    from test_verified_artefacts import flip, truncate

    _, run_dir, metrics, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {p: p.read_bytes() for p in (run_dir / "manifest").rglob("*.json")}
    truncate(copy / "seed-0" / "states" / "xbt" / "text.pt")
    flip(copy / "store" / "method=old" / "version=0" / "eval_set=corpus" / "part-0.arrow")
    assert main(["report", "--verify", str(copy)]) == 2
    assert f"compat run --resume {copy} --verify`" in capsys.readouterr().err
    assert main(["run", "--resume", str(copy), "--verify"]) == 0
    changed = {str(p.relative_to(run_dir / "manifest")) for p, data in before.items()
               if (copy / p.relative_to(run_dir)).read_bytes() != data}
    assert changed == {"encode-old.json", "seed-0/xbt/text.json", "seed-0/xbt/pairs.json"}
    assert json.loads((copy / "metrics.json").read_text())["methods"] == json.loads(json.dumps(metrics["methods"]))


def test_cli_errors_before_anything_is_written(tmp_path, capsys):
    bad = {**TINY, "data": {"source": "files", "eval": {"path": str(tmp_path / "nope.json")},
                            "corpus": {"path": str(tmp_path / "c.txt")}, "pairs": {"path": str(tmp_path / "p.csv")}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DataError):
        crossmodal.run_crossmodal(parse_crossmodal(bad), tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_recall_matches_a_brute_force_reference():
    rng = np.random.default_rng(3)
    images = rng.standard_normal((12, 5)).astype(np.float32)
    caption_of = np.sort(rng.integers(0, 12, 40))
    captions = (images[caption_of] + rng.standard_normal((40, 5))).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(images) @ unit(captions).T
    ks = (1, 3, 5)
    scores = cross_modal_recall(images, captions, caption_of, captions, images, ks=ks)
    has_caption = np.isin(np.arange(12), caption_of)
    for k in ks:
        top_captions = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        i2t = [np.any(caption_of[top_captions[i]] == i) for i in np.flatnonzero(has_caption)]
        top_images = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]
        t2i = [caption_of[c] in top_images[c] for c in range(40)]
        assert scores[f"i2t_r{k}"] == pytest.approx(np.mean(i2t))
        assert scores[f"t2i_r{k}"] == pytest.approx(np.mean(t2i))


def test_instance_captions_describe_the_painted_square():
    from orchestrator.data.instance_captions import COLOURS, describe, paint_squares

    rng = np.random.default_rng(0)
    blank = np.zeros((3, 32, 32, 3), np.uint8)
    colours, rows, sizes = np.array([0, 6, 2]), np.array([0, 2, 1]), np.array([1, 0, 1])
    painted = paint_squares(blank, colours, rows, sizes, rng)
    for image, colour, row, side in zip(painted, colours, rows, (10, 6, 10)):
        mask = image.any(axis=-1)
        ys, xs = np.nonzero(mask)
        assert mask.sum() == side * side and (image[mask] == list(COLOURS.values())[colour]).all()
        assert abs(ys.mean() - [0.2, 0.5, 0.8][row] * 32) <= 3  # centred on its row, up to the jitter
    texts = describe(np.array([0, 1, 2]), colours, rows, sizes, ["cat", "dog", "fox"], per_image=8, rng=rng)
    assert len(set(texts[0])) == 8 and "a photo of a cat with a large red square at the top." in texts[0]
    assert "a small white square at the bottom." in texts[1]


def test_upstream_pretraining_on_instance_captions(tmp_path):
    from methods.nets.clip_models import create_clip
    from orchestrator.config import DataConfig, UpstreamClipConfig
    from orchestrator.engine.upstream_clip import pretrain_clip

    recipe = UpstreamClipConfig(captions="instance", captions_per_image=2, images_per_class=4, epochs=1, batch_size=8)
    data = DataConfig(num_classes=4, train_per_class=4, test_per_class=2)
    checkpoint = pretrain_clip("tiny-vit-w32", recipe, data, tmp_path)
    assert pretrain_clip("tiny-vit-w32", recipe, data, tmp_path) == checkpoint  # cached
    create_clip("tiny-vit-w32", str(checkpoint.local_path("model.pt")))  # loads strictly


def test_new_to_new_uses_the_untouched_base_model(finished_run):
    from methods.nets.lora import lora_disabled
    from orchestrator.data.crossmodal import eval_set
    from orchestrator.engine.worker import embed_array
    from orchestrator.storage.store import EmbeddingStore

    cfg, run_dir, _, _ = finished_run
    clip, _, transform = crossmodal_steps._load(cfg.models.new, cfg.data, torch.device("cpu"), run_dir)
    state = torch.load(run_dir / "seed-0" / "states" / "xbt" / "pairs.pt", weights_only=True)
    method = create_crossmodal("xbt", cfg.methods[1].params)
    encoder = method.query_encoder(clip, state, 64, 32)
    images = eval_set(cfg.data, 32).images
    rows = np.arange(len(images))
    with lora_disabled(encoder.clip):
        base = embed_array(lambda x: F.normalize(encoder.clip.encode_image(x), dim=-1), images, rows, transform,
                           cfg.evaluation.batch_size, torch.device("cpu"))
    stored = EmbeddingStore(run_dir / "store").read("new", 1, "images").embeddings
    np.testing.assert_array_equal(base, stored)
    adapted = embed_array(encoder.encode_image, images, rows, transform, 64, torch.device("cpu"))
    assert adapted.shape == (len(images), 32)  # queries live in the old space


def test_trained_stages_record_throughput_as_unimodal_steps_do(finished_run):
    """Pairs per second and FLOPs per pair counted on the first batch (the CLIP towers' forward and
    backward in the pairs stage, the projection in the text stage); a training-free stage records none."""
    _, run_dir, _, _ = finished_run
    entries = {p.relative_to(run_dir / "manifest").as_posix(): json.loads(p.read_text())
               for p in (run_dir / "manifest").rglob("*.json")}
    stages = {name: entry for name, entry in entries.items() if "stage" in entry}
    for name, entry in stages.items():
        record = entry.get("throughput")
        if entry["method"] == "procrustes":
            assert record is None, name
            continue
        assert record["pairs_per_second"] > 0 and record["timed_pairs"] > 0, name
        assert record["train_flops_per_pair"] > 0 and record["precision"] == "fp32", name
        assert record["mfu"] is None and "cpu" in record["mfu_note"], name
    flops = {entry["stage"]: entry["throughput"]["train_flops_per_pair"]
             for entry in stages.values() if entry["method"] == "xbt"}
    assert flops["pairs"] > 100 * flops["text"]  # the towers' forward and backward dwarf a projection's
