"""OCA: the orthogonal layer, the prototypes, the loss against a manual computation, widening chains
with truncated cross-tests (one tiny in-process run), fine-tuning, and the BCT-style report table."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import StepContext, create_method
from methods.oca import oca_loss
from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator.config import ModelConfig, TrainingConfig
from orchestrator import load_config
from orchestrator.errors import ConfigError
from orchestrator.evaluation import retrieval_scores
from orchestrator.storage.store import EmbeddingStore

MODEL = ModelConfig(width=4, embedding_dim=6)


def ctx(index, num_seen, event="train", init=None):
    return StepContext(index=index, num_steps=3, num_seen=num_seen, num_previous=0, event=event, model=MODEL,
                       training=TrainingConfig(), seed=0, init_checkpoint=init)


def oca(**params):
    return create_method("oca", {"delta_dim": 2, **params}, MODEL)


def images(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def manual_ce(logits, label, eps):
    logp = [v - math.log(sum(math.exp(x) for x in logits)) for v in logits]
    return -((1 - eps) * logp[label] + eps / len(logits) * sum(logp))


def test_width_grows_by_delta_and_version_zero_is_the_independent_network():
    method = oca()
    assert [method.build_model(ctx(t, 4)).embedding_dim for t in range(3)] == [6, 8, 10]
    assert method.build_model(ctx(0, 4)).rotation is None
    torch.manual_seed(3)
    plain = create_method("independent", {}, MODEL).build_model(ctx(0, 4))
    torch.manual_seed(3)
    first = method.build_model(ctx(0, 4))
    assert plain.state_dict().keys() == first.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), first.state_dict().values()))


@pytest.mark.parametrize("bias", [True, False])
def test_orthogonal_layer_stays_orthogonal_and_keeps_norms_after_training(bias):
    torch.manual_seed(0)
    method = oca(rotation_bias=bias)
    model = method.build_model(ctx(1, 4))
    assert (model.rotation.bias is not None) == bias
    start = model.rotation.weight.detach().clone()
    prototypes = F.normalize(torch.randn(4, 6), dim=1) * 0.8
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = images(16), torch.arange(16) % 4
    for _ in range(5):
        out = model(x)
        loss, _ = oca_loss(out["logits"], out["feature"], y, prototypes, classifier_weight=5, prototype_weight=10,
                           cosine_weight=5, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    Q = model.rotation.weight.detach()
    assert not torch.allclose(Q, start, atol=1e-3)  # training moved it ...
    assert torch.allclose(Q.T @ Q, torch.eye(8), atol=1e-5)  # ... on the orthogonal group
    h = F.normalize(torch.randn(32, 8), dim=1)
    b = model.rotation.bias if bias else torch.zeros(8)
    with torch.no_grad():
        assert torch.allclose((model.rotation(h) - b).norm(dim=1), h.norm(dim=1), atol=1e-5)


def test_prototypes_are_the_old_served_feature_averaged_per_class():
    torch.manual_seed(0)
    method = oca()
    old = method.build_model(ctx(1, 3)).eval()  # a widened (8-d) previous version
    x, y = images(12), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    (P,) = method.prepare(ctx(2, 5), method.build_model(ctx(2, 5)), old, loader)["prototypes"]
    with torch.no_grad():
        served = method.embed(old, x)
        manual = torch.stack([torch.stack([served[i] for i in range(12) if y[i] == c]).mean(0) for c in range(5)])
        assert torch.allclose(served, F.normalize(old.net(x), dim=1))
    assert P.shape == (5, 8) and torch.allclose(P, manual, atol=1e-6)
    assert (P.norm(dim=1) < 1).all()  # means of unit vectors, not re-normalised
    (renormalized,) = oca(renormalize_prototypes=True).prepare(ctx(2, 5), None, old, loader)["prototypes"]
    assert torch.allclose(renormalized, F.normalize(manual, dim=1), atol=1e-6)
    assert method.prepare(ctx(0, 5), None, None, loader) == {}  # version 0 aligns to nothing


def test_loss_matches_a_manual_computation():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    feature = torch.tensor([[3.0, 4.0, 9.0], [0.0, -2.0, 1.0]])  # only the first 2 dims are aligned
    prototypes = torch.tensor([[0.6, 0.0], [0.0, 0.5], [0.3, 0.4]])
    labels = torch.tensor([2, 1])
    eps = 0.1
    got, parts = oca_loss(logits, feature, labels, prototypes, classifier_weight=5, prototype_weight=10,
                          cosine_weight=5, label_smoothing=eps)
    aligned = [[0.6, 0.8], [0.0, -1.0]]  # norm(h[:2])
    proto_logits = [[a[0] * p[0] + a[1] * p[1] for p in prototypes.tolist()] for a in aligned]
    ce = (manual_ce([1.0, 0.0, -1.0], 2, eps) + manual_ce([0.5, 2.0, 0.0], 1, eps)) / 2
    proto_ce = (manual_ce(proto_logits[0], 2, eps) + manual_ce(proto_logits[1], 1, eps)) / 2
    cosine = ((1 - (0.6 * 0.3 + 0.8 * 0.4) / 0.5) + (1 - (-1.0 * 0.5) / 0.5)) / 2  # P_2 = 0.5 (0.6, 0.8)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    assert parts["prototype_ce"].item() == pytest.approx(proto_ce, abs=1e-6)
    assert parts["cosine"].item() == pytest.approx(cosine, abs=1e-6)
    assert got.item() == pytest.approx(5 * ce + 10 * proto_ce + 5 * cosine, abs=1e-5)
    assert parts["cosine"].item() == pytest.approx(1.0)  # one sample on its prototype (0), one opposite (2)


def test_align_to_all_has_one_prototype_set_per_earlier_version():
    """Version 2 aligns its first d_0 dims to v0's class means and its first d_1 dims to v1's."""
    torch.manual_seed(0)
    method = oca(align_to="all")
    earlier = {0: method.build_model(ctx(0, 3)).eval(), 1: method.build_model(ctx(1, 4)).eval()}
    x, y = images(10), torch.tensor([0, 1, 2, 3, 4] * 2)
    step = dataclasses.replace(ctx(2, 5), load_version=earlier.__getitem__)
    P0, P1 = method.prepare(step, None, earlier[1], [(x, y)])["prototypes"]
    with torch.no_grad():
        for P, model in ((P0, earlier[0]), (P1, earlier[1])):
            served = method.embed(model, x)
            assert torch.allclose(P, torch.stack([served[y == c].mean(0) for c in range(5)]), atol=1e-6)
    assert P0.shape == (5, 6) and P1.shape == (5, 8)  # widths d_0 = 6, d_1 = 6 + Δd
    feature, logits, labels = F.normalize(torch.randn(10, 10), dim=1), torch.randn(10, 5), y
    weights = dict(classifier_weight=5, prototype_weight=10, cosine_weight=5, label_smoothing=0.1)
    _, both = oca_loss(logits, feature, labels, [P0, P1], **weights)
    _, only0 = oca_loss(logits, feature, labels, P0, **weights)
    _, only1 = oca_loss(logits, feature, labels, P1, **weights)
    for part in ("prototype_ce", "cosine"):  # the terms are averaged over the earlier versions
        assert both[part].item() == pytest.approx((only0[part].item() + only1[part].item()) / 2, abs=1e-6)


def test_fine_tuning_grows_the_embedding_and_starts_a_fresh_orthogonal_layer(tmp_path):
    torch.manual_seed(0)
    method = oca()
    previous = method.build_model(ctx(1, 4))
    torch.save(previous.state_dict(), tmp_path / "model.pt")
    model = method.init_model(ctx(2, 6, event="finetune", init=str(tmp_path)))
    assert torch.equal(model.net.embedding.weight[:8], previous.net.embedding.weight)
    assert torch.equal(model.classifier.weight[:4, :8], previous.classifier.weight)
    assert torch.allclose(model.rotation.weight.T @ model.rotation.weight, torch.eye(10), atol=1e-5)
    assert method.load_version(ctx(1, 4), str(tmp_path)).embedding_dim == 8


@pytest.mark.parametrize("params, key", [({"delta_dim": -1}, "delta_dim"), ({"cosine_weight": -2}, "cosine_weight"),
                                         ({"prototype_transform": "val"}, "prototype_transform")])
def test_bad_params_name_their_key(params, key):
    with pytest.raises(ConfigError) as err:
        create_method("oca", params, MODEL, key="methods.2")
    assert err.value.key == f"methods.2.params.{key}"


@pytest.mark.parametrize("name", ["oca_synthetic", "oca_chain_synthetic", "oca_cifar100"])
def test_shipped_configs_hold_the_reference_recipe(name):
    """Each shipped OCA config, as the methods resolve it: OCA's 5 / 10 / 5 losses with label smoothing 0.1,
    a width growing in the reference's 160 / 128 ratio, an affine orthogonal layer, prototypes not
    re-normalised under the training augmentation; BCT as the OCA codebase configures it (class means,
    λ = 10, no logit scale)."""
    cfg = load_config(name)
    assert [m.name for m in cfg.methods] == ["independent", "bct", "oca"]
    bct, oca = (create_method(spec.name, spec.params, cfg.model) for spec in cfg.methods[1:])
    unset = ctx(1, 2)
    training = cfg.method_training(cfg.methods[2])
    assert oca.label_smoothing(dataclasses.replace(unset, training=training)) == 0.1
    assert (oca.params.classifier_weight, oca.params.prototype_weight, oca.params.cosine_weight) == (5, 10, 5)
    assert oca.embedding_dim(1) / oca.embedding_dim(0) == 160 / 128
    assert oca.params.rotation_bias and not oca.params.renormalize_prototypes and oca.prepare_transform() == "train"
    assert (bct.params.variant, bct.params.resolved_weight, bct.params.logit_scale) == ("class_means", 10.0, 1.0)
    assert cfg.model.normalize and not cfg.model.final_relu


def test_cifar100_config_is_the_papers_setting_and_schedule():
    """Old model on labels 0-49, new on 0-99, 128-d ResNet-50; Adam 1e-3, weight decay 2^-15, batch 64,
    100 epochs with the reference's per-epoch schedule, computed here from its formula."""
    from orchestrator.engine.scenarios import plan_steps
    from orchestrator.engine.loop import lr_at

    cfg = load_config("oca_cifar100")
    assert [s.num_seen for s in plan_steps(cfg, 100)] == [50, 100] and cfg.scenario.event == "train"
    assert (cfg.model.backbone, cfg.model.embedding_dim) == ("resnet50", 128)
    t = cfg.training
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs) == ("adam", 1e-3, 2 ** -15, 64, 100)
    for e in range(100):
        want = 1e-3 * (e + 1) / 5 if e < 5 else 0.5 * (1 + math.cos(math.pi * (e - 5) / 95)) * 1e-3
        assert lr_at(e, t) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """Three versions (2, 4, 6 classes) of independent, oca and oca aligned to every earlier version,
    in-process, on tiny synthetic data."""
    tmp = tmp_path_factory.mktemp("oca")
    cfg = load_config(None, [
        "name=oca_chain", "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=6",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "model.width=4", "model.embedding_dim=8", "training.epochs=2", "training.incremental={}", "training.batch_size=16",
        "resources.num_workers=0", "methods=[{name: independent}, {name: oca, params: {delta_dim: 4}}, "
        "{name: oca, label: oca-all, params: {delta_dim: 4, align_to: all}}]",
    ])
    cfg.output_dir = str(tmp)
    metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    return tmp / cfg.name, metrics


def test_chain_serves_growing_widths_and_cross_tests_truncate(chain_run):
    run_dir, metrics = chain_run
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    tables = [store.read("oca", v, "test") for v in range(3)]
    assert [t.embeddings.shape[1] for t in tables] == [8, 12, 16]
    matrix = metrics["methods"]["oca"]["matrices"]
    for new, old in [(1, 0), (2, 0), (2, 1)]:
        d = tables[old].embeddings.shape[1]
        query = tables[new].embeddings[:, :d]
        query = query / np.linalg.norm(query, axis=1, keepdims=True)  # ĥ: truncated, re-normalised
        manual = retrieval_scores(query, tables[new].labels, tables[old].embeddings, tables[old].labels,
                                  leave_one_out=True)
        assert matrix["cmc1"][new][old] == pytest.approx(manual["cmc1"])
        assert matrix["map"][new][old] == pytest.approx(manual["map"])
    assert metrics["methods"]["oca"]["params"]["delta_dim"] == 4


def test_version_zero_is_shared_with_independent(chain_run):
    run_dir, metrics = chain_run
    load = lambda key: torch.load(run_dir / "versions" / key / "v0" / "model.pt", weights_only=True)  # noqa: E731
    ours, theirs = load("oca"), load("independent")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert metrics["methods"]["oca"]["matrices"]["map"][0][0] == metrics["methods"]["independent"]["matrices"]["map"][0][0]


def test_update_gain_and_its_table_from_the_store(chain_run):
    """The update gain (M(new, old) − M(old, old)) / (M(new*, new*) − M(old, old)), new* = independent's last
    version, with every cell recomputed from the stored embeddings (truncate-and-renormalise, leave-one-out)
    rather than read from metrics.json; the report's update row shows those numbers."""
    run_dir, metrics = chain_run
    store = EmbeddingStore(runfiles.store_dir(run_dir))

    def cell(query_key, query_version, gallery_key, gallery_version):
        q, g = store.read(query_key, query_version, "test"), store.read(gallery_key, gallery_version, "test")
        d = min(q.embeddings.shape[1], g.embeddings.shape[1])
        trim = lambda x: x[:, :d] / np.linalg.norm(x[:, :d], axis=1, keepdims=True)  # noqa: E731
        return retrieval_scores(trim(q.embeddings), q.labels, trim(g.embeddings), g.labels, leave_one_out=True)["map"]

    old_old, new_old = cell("oca", 0, "oca", 0), cell("oca", 2, "oca", 0)
    new_new, star = cell("oca", 2, "oca", 2), cell("independent", 2, "independent", 2)
    gain = (new_old - old_old) / (star - old_old)
    assert metrics["methods"]["oca"]["update_gain"]["map"] == pytest.approx(gain, rel=1e-6)
    text = (run_dir / "report.md").read_text()
    assert "## Update: first version (old) vs last version (new)" in text
    ecc = "yes" if new_old > old_old else "no"
    assert f"| oca | map | {old_old:.3f} | {new_old:.3f} | {new_new:.3f} | {ecc} | {gain:.3f} |" in text
    assert (run_dir / "heatmap_oca.png").is_file()


def test_align_to_all_runs_in_a_chain_and_shares_only_version_0(chain_run):
    run_dir, metrics = chain_run
    assert runfiles.manifest_entry(run_dir, "oca-all", 0)["copied_from"] == "independent"
    assert "copied_from" not in runfiles.manifest_entry(run_dir, "oca-all", 2)
    assert metrics["methods"]["oca-all"]["params"]["align_to"] == "all"
    assert len(metrics["methods"]["oca-all"]["matrices"]["cmc1"]) == 3
