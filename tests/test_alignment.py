"""Training-free adapters: each fit against an independent optimum, the config checks, and the method
end to end (served embeddings and upgraded galleries recomputed from the store)."""

import numpy as np
import pytest
import torch

from methods.alignment import (affine_least_squares, affine_map, apply_map, fit_residual_mlp, low_rank_affine,
                               mean_squared_error, orthogonal_procrustes)
from orchestrator.errors import ConfigError


def _objective(a, b, x, y):
    return float(((x @ a + b - y) ** 2).sum())


def test_orthogonal_fit_equals_scipy():
    from scipy.linalg import orthogonal_procrustes as scipy_procrustes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) * rng.uniform(0.3, 2.0, 12)
    y = x @ np.linalg.qr(rng.standard_normal((12, 12)))[0] + 0.1 * rng.standard_normal((300, 12))
    np.testing.assert_allclose(orthogonal_procrustes(x, y), scipy_procrustes(x, y)[0], atol=1e-10)


def test_affine_fit_equals_the_normal_equations():
    """Centred normal equations, solved directly: A = (XcᵀXc)⁻¹XcᵀYc, b = ȳ − x̄A."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 7))
    y = x @ rng.standard_normal((7, 5)) + rng.standard_normal(5) + 0.2 * rng.standard_normal((200, 5))
    a, b = affine_least_squares(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.solve(xc.T @ xc, xc.T @ yc)
    np.testing.assert_allclose(a, expected, atol=1e-10)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ expected, atol=1e-10)


def test_low_rank_fit_is_the_optimum_an_explicit_search_finds():
    """Over every A = U Vᵀ (U: 6×2, V: 4×2) and b, L-BFGS from many starts finds no lower residual than the
    closed form, and reaches it; the closed form has rank 2, and at full rank it is the affine fit."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 6)) * np.array([2.0, 1.5, 1.0, 0.7, 0.5, 0.3])
    y = x @ rng.standard_normal((6, 4)) + rng.standard_normal(4) + 0.3 * rng.standard_normal((60, 4))
    a, b = low_rank_affine(x, y, rank=2)
    assert np.linalg.matrix_rank(a, tol=1e-9) == 2

    def residual_and_gradient(p):
        u, v, bias = p[:12].reshape(6, 2), p[12:20].reshape(4, 2), p[20:]
        r = x @ u @ v.T + bias - y
        g = 2 * x.T @ r  # d/dA
        return float((r ** 2).sum()), np.concatenate([(g @ v).ravel(), (g.T @ u).ravel(), 2 * r.sum(0)])

    best = min(minimize(residual_and_gradient, rng.standard_normal(24), jac=True, method="L-BFGS-B",
                        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000}).fun for _ in range(3))
    assert _objective(a, b, x, y) <= best + 1e-8
    assert _objective(a, b, x, y) == pytest.approx(best, rel=1e-6)
    full, full_bias = low_rank_affine(x, y, rank=4)
    np.testing.assert_allclose(full, affine_least_squares(x, y)[0], atol=1e-10)
    np.testing.assert_allclose(full_bias, affine_least_squares(x, y)[1], atol=1e-10)


def test_apply_map_by_hand():
    params = {"weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "bias": torch.tensor([0.5, 0.0]),
              "hidden_weight": torch.tensor([[1.0], [-1.0]]), "hidden_bias": torch.tensor([0.0]),
              "out_weight": torch.tensor([[3.0, 1.0]])}
    # x = (2, 1): affine (2.5, 2); hidden relu(2 - 1) = 1 adds (3, 1) -> (5.5, 3); x = (1, 2): relu(-1) = 0
    out = apply_map(params, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[5.5, 3.0], [1.5, 4.0]]))


def test_residual_mlp_never_loses_to_affine_and_recovers_a_nonlinear_map():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 6))
    # an affine map plus noise: the MLP's training loss ends at or below the affine optimum's
    y = x @ rng.standard_normal((6, 6)) + 0.1 * rng.standard_normal((400, 6))
    mlp = fit_residual_mlp(x, y, hidden=16, steps=100, lr=1e-2, seed=0)
    assert mean_squared_error(mlp, x, y) <= mean_squared_error(affine_map(*affine_least_squares(x, y)), x, y)
    # a known nonlinear map: on held-out items the MLP is far closer than the best affine map
    w = rng.standard_normal((6, 6))
    target = lambda z: z + np.tanh(z @ w) ** 2  # noqa: E731
    held_out = rng.standard_normal((400, 6))
    mlp = fit_residual_mlp(x, target(x), hidden=64, steps=300, lr=1e-2, seed=0)
    affine = affine_map(*affine_least_squares(x, target(x)))
    assert mean_squared_error(mlp, held_out, target(held_out)) < 0.5 * mean_squared_error(affine, held_out, target(held_out))


def test_fewer_pairs_than_dimensions_is_a_config_error(tmp_path):
    from helpers import config_under

    with pytest.raises(ConfigError, match=r"methods\.1\.params\.pairs.*64-dimensional.*at least 65"):
        config_under(tmp_path, "methods=[{name: independent}, {name: adapter, params: {kind: affine, pairs: 64}}]")
    with pytest.raises(ConfigError, match=r"methods\.0\.params\.rank"):
        config_under(tmp_path, "methods=[{name: adapter, params: {kind: affine, rank: 4}}]")
    with pytest.raises(ConfigError, match=r"methods\.0\.params.*'independent'.*no earlier method"):
        config_under(tmp_path, "methods=[{name: adapter, params: {base: independent}}, {name: independent}]")
    config_under(tmp_path, "methods=[{name: adapter, params: {kind: orthogonal, pairs: 64}}]")  # a rotation: d suffice
    with pytest.raises(ConfigError, match=r"methods\.0\.params.*approximate index"):
        config_under(tmp_path, "methods=[{name: adapter, params: {direction: old_to_new}}]",
                     "evaluation.search.index={type: hnsw}")
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_adapter_on_a_base_waits_for_the_same_step_of_its_base(tmp_path):
    from helpers import config_under

    from orchestrator.engine.graph import COPY, TRAIN, plan

    cfg = config_under(tmp_path, "methods=[{name: independent}, {name: adapter, label: a, params: {base: independent}}]")
    tasks = plan(cfg).tasks
    assert tasks["a/step-000"].action == COPY and tasks["a/step-000"].deps == ("independent/step-000",)
    assert tasks["a/step-002"].action == TRAIN
    assert tasks["a/step-002"].deps == ("a/step-001", "independent/step-002")


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """Three versions of independent and two adapters, in-process, on tiny synthetic data: an affine map
    into version 0's space on a chain it trains itself, and a residual MLP upgrading stored vectors on
    independent's versions (loaded, not trained again); with a service simulation (every item arrives
    with the step that first trains its class)."""
    from orchestrator import load_config
    from orchestrator.engine import driver

    tmp = tmp_path_factory.mktemp("adapters")
    cfg = load_config(None, [
        "name=adapters", "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=6",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "model.width=4", "model.embedding_dim=8", "training.epochs=2", "training.incremental={}",
        "training.batch_size=16", "resources.num_workers=0",
        "methods=[{name: independent}, {name: adapter, label: to-old, params: {kind: affine, pairs: 20}}, "
        "{name: adapter, label: upgrade, params: {kind: residual_mlp, direction: old_to_new, pairs: 20, "
        "hidden: 8, fit_steps: 50, base: independent}}]",
        "service={budgets: [0, 50, 100], policies: [random, uncertainty]}",
    ])
    cfg.output_dir = str(tmp)
    return tmp / cfg.name, driver.run_experiment(cfg, progress=False, echo=lambda s: None)


def _numpy_map(params, x):
    p = {k: v.double().numpy() for k, v in params.items()}
    y = x @ p["weight"] + p["bias"]
    if "hidden_weight" in p:
        y = y + np.maximum(x @ p["hidden_weight"] + p["hidden_bias"], 0) @ p["out_weight"]
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_new_to_old_serves_the_new_embedding_mapped_into_version_0(adapter_run):
    """The adapter's backbone is independent's (same recipe and seed), so its stored vectors are
    independent's mapped by the fitted map that version 1 saved with its weights."""
    from orchestrator.storage import runfiles
    from orchestrator.storage.store import EmbeddingStore

    run_dir, metrics = adapter_run
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    for version in (1, 2):
        weights = runfiles.version_weights(run_dir, "to-old", version)
        fitted = {k.removeprefix("to_first."): v for k, v in weights.items() if k.startswith("to_first.")}
        expected = _numpy_map(fitted, store.read("independent", version, "test").embeddings.astype(np.float64))
        np.testing.assert_allclose(store.read("to-old", version, "test").embeddings, expected, atol=1e-5)
    assert runfiles.gallery_upgrade(run_dir, "to-old", 1) is None
    assert metrics["methods"]["to-old"]["params"]["kind"] == "affine"


def test_old_to_new_cells_search_the_upgraded_stored_gallery(adapter_run):
    """Cell (2, 0): version 2's queries against version 0's stored vectors passed through the maps of
    versions 1 and 2 in turn; the diagonal is the plain self-test (equal to independent's)."""
    from orchestrator.evaluation import retrieval_scores
    from orchestrator.storage import runfiles
    from orchestrator.storage.store import EmbeddingStore

    run_dir, metrics = adapter_run
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    tables = [store.read("upgrade", v, "test") for v in range(3)]
    maps = [None, *(runfiles.gallery_upgrade(run_dir, "upgrade", v) for v in (1, 2))]
    assert set(maps[1]) == {"weight", "bias", "hidden_weight", "hidden_bias", "out_weight"}
    matrix = metrics["methods"]["upgrade"]["matrices"]
    for query, gallery in [(1, 0), (2, 0), (2, 1), (2, 2)]:
        vectors = tables[gallery].embeddings.astype(np.float64)
        for k in range(gallery + 1, query + 1):
            vectors = _numpy_map(maps[k], vectors)
        manual = retrieval_scores(tables[query].embeddings, tables[query].labels, vectors.astype(np.float32),
                                  tables[gallery].labels, leave_one_out=True)
        assert matrix["map"][query][gallery] == pytest.approx(manual["map"], abs=1e-9)
        assert matrix["cmc1"][query][gallery] == pytest.approx(manual["cmc1"], abs=1e-9)
    assert matrix["map"][2][2] == metrics["methods"]["independent"]["matrices"]["map"][2][2]
    entry = runfiles.manifest_entry(run_dir, "upgrade", 2)
    assert entry["weights_from"] == "independent" and entry["trainable_parameters"] == 0
    assert any(key.endswith("v2/gallery_upgrade.pt") for key in entry["artefacts"])


def _served_as_of(maps, tables, version, step, items):
    """Version ``version``'s stored vectors of ``items`` as the service holds them at ``step``: passed
    through the maps of versions version+1..step in turn (none for a method without maps)."""
    vectors = tables[version].embeddings[items].astype(np.float64)
    for k in range(version + 1, step + 1):
        if maps[k] is not None:
            vectors = _numpy_map(maps[k], vectors)
    return vectors


def test_the_service_serves_upgraded_stored_vectors_and_mapped_queries(adapter_run):
    """No backfill: at step t each item keeps the vector of the version of its arrival, upgraded through
    the maps up to t (old_to_new) or as stored (new_to_old: every version's vectors, queries included,
    already live in version 0's space); recomputed here from the store and the saved maps."""
    from orchestrator.data import dataset_num_classes
    from orchestrator.engine.driver import class_blocks, load_run_config
    from orchestrator.engine.gallery_upgrade import stored_vector_upgrade
    from orchestrator.evaluation import retrieval_scores
    from orchestrator.evaluation.mixed_gallery import StoredVersions
    from orchestrator.storage import runfiles
    from orchestrator.storage.store import EmbeddingStore

    run_dir, metrics = adapter_run
    cfg = load_run_config(run_dir)
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    for method in ("upgrade", "to-old"):
        tables = [store.read(method, v, "test") for v in range(3)]
        labels = tables[0].labels
        arrival = class_blocks(cfg, dataset_num_classes(cfg.data))[1][labels]
        maps = [None, *(runfiles.gallery_upgrade(run_dir, method, v) for v in (1, 2))]
        service = metrics["service"]["methods"][method]
        for step in range(3):
            present = np.flatnonzero(arrival <= step)
            gallery = np.concatenate([_served_as_of(maps, tables, int(version), step, present[arrival[present] == version])
                                      for version in np.unique(arrival[present])])
            order = np.concatenate([present[arrival[present] == version] for version in np.unique(arrival[present])])
            manual = retrieval_scores(tables[step].embeddings[order], labels[order], gallery.astype(np.float32),
                                      labels[order], leave_one_out=True)
            row = service["references"]["no_backfill"][step]
            assert row["map"] == pytest.approx(manual["map"], abs=1e-6), (method, step)
            assert row["cmc1"] == pytest.approx(manual["cmc1"], abs=1e-6), (method, step)
        assert len(np.unique(arrival)) == 3  # step 2's gallery mixes all three versions
        # the run stored the same bookkeeping: without backfill each item is served by its arrival's version
        served = runfiles.read_served_versions(run_dir, method).to_pandas()
        kept = served[(served.policy == "no_backfill") & (served.step == 2)].sort_values("sample_id")
        assert np.array_equal(kept.served_version.to_numpy(), arrival[np.argsort(tables[0].sample_ids)])
        assert np.array_equal(kept.arrival_step.to_numpy(), kept.served_version.to_numpy())
    assert stored_vector_upgrade(run_dir, "to-old", 2) is None
    # uncertainty-first backfills where the served (upgraded) vector disagrees most with the new embedding
    tables = [store.read("upgrade", v, "test") for v in range(3)]
    maps = [None, *(runfiles.gallery_upgrade(run_dir, "upgrade", v) for v in (1, 2))]
    versions = StoredVersions.read(store, "upgrade", 3, cfg.evaluation, stored_vector_upgrade(run_dir, "upgrade", 2))
    served = np.arange(len(labels)) % 3
    expected = np.empty(len(labels))
    for version in range(3):
        items = np.flatnonzero(served == version)
        upgraded = _served_as_of(maps, tables, version, 2, items)
        new = tables[2].embeddings[items].astype(np.float64)
        expected[items] = 1 - np.sum(upgraded * new, axis=1) / np.linalg.norm(new, axis=1) / np.linalg.norm(upgraded, axis=1)
    np.testing.assert_allclose(versions.disagreement(2, served), expected, atol=1e-5)


def test_the_release_gate_upgrades_the_old_gallery_of_an_old_to_new_run(adapter_run, capsys):
    """compat check between two versions of one old_to_new method: its cells are the run's matrix cells
    (new/old on the upgraded gallery); against a gallery its maps cannot reach it refuses (exit 2)."""
    import json

    from orchestrator.cli import main

    run_dir, metrics = adapter_run
    matrix = metrics["methods"]["upgrade"]["matrices"]
    for old, new in ((0, 2), (1, 2), (0, 1)):
        code = main(["check", "--old", str(run_dir), "--old-method", "upgrade", "--old-version", str(old),
                     "--new", str(run_dir), "--new-method", "upgrade", "--new-version", str(new),
                     "--resamples", "20", "--json"])
        result = json.loads(capsys.readouterr().out)
        assert code in (0, 1) and result["old_gallery_upgraded"] is True
        for cell, (i, j) in (("old_old", (old, old)), ("new_old", (new, old)), ("new_new", (new, new))):
            assert result[cell]["cmc1"] == pytest.approx(matrix["cmc1"][i][j], abs=1e-9), (old, new, cell)
            assert result[cell]["map"] == pytest.approx(matrix["map"][i][j], abs=1e-9), (old, new, cell)
        for cell, flips in metrics["methods"]["upgrade"]["negative_flip_rate"].items():
            assert result["negative_flip_rate"][cell]["estimate"] == pytest.approx(flips[new][old], abs=1e-9)
    for entry in metrics["methods"]["upgrade"]["gate"]:  # every run's own gate searches upgraded galleries too
        new, old = entry["new_version"], entry["old_version"]
        assert entry["old_gallery_upgraded"] is True
        assert entry["new_old"]["cmc1"] == pytest.approx(matrix["cmc1"][new][old], abs=1e-9)
        assert entry["new_old"]["map"] == pytest.approx(matrix["map"][new][old], abs=1e-9)
    for old_method, old_version in (("independent", 0), ("upgrade", 2)):
        code = main(["check", "--old", str(run_dir), "--old-method", old_method, "--old-version", str(old_version),
                     "--new", str(run_dir), "--new-method", "upgrade", "--new-version", "1", "--resamples", "20"])
        assert code == 2 and "--old-version K with K <= 1" in capsys.readouterr().err
