"""faiss top-k search against the full ranking and an independent reference; approximate indexes built once."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from orchestrator.config import EvaluationConfig, SearchConfig, SearchIndexConfig
from orchestrator.errors import ConfigError, DataError
from orchestrator.evaluation import compatibility_row, metrics, per_query_scores, search, truncate_and_normalize
from orchestrator.evaluation.flips import TOP1_CORRECT, unpack_correct
from orchestrator.storage.run_storage import RunStorage
from orchestrator.storage.store import EmbeddingStore
from ranking_reference import reference_scores


def tied_data(n=400, d=8, classes=12, seed=0):
    """Clustered vectors where a third of the samples are exact copies of others, and one block of 40
    identical items: ties inside lists and at their ends."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = (rng.standard_normal((classes, d))[labels] + 0.8 * rng.standard_normal((n, d))).astype(np.float32)
    copies, sources = rng.choice(n, n // 3, replace=False), rng.choice(n, n // 3)
    x[copies], labels[copies] = x[sources], labels[sources]
    x[100:140], labels[100:140] = x[99], labels[99]
    return x, labels.astype(np.int64)


def reference_lists(query, gallery, leave_one_out):
    """Each query's ranked gallery indices from the independent float64 reference (stable sort: ties to the
    lower gallery index)."""
    scores = reference_scores(query, gallery)
    out = []
    for n in range(len(query)):
        candidates = np.delete(np.arange(len(gallery)), n) if leave_one_out else np.arange(len(gallery))
        out.append(candidates[np.argsort(-scores[n, candidates], kind="stable")])
    return out


def reference_truncated_ap(ranked_labels, label, num_relevant, cutoff):
    """AP truncated at ``cutoff``, walking down one ranked list."""
    hits, total = 0, 0.0
    for rank, other in enumerate(ranked_labels[:cutoff], start=1):
        if other == label:
            hits += 1
            total += hits / rank
    return total / min(num_relevant, cutoff)


def test_truncated_average_precision_by_hand():
    # query 0: R = 3, relevant at ranks 1, 3, 6; query 1: R = 2, relevant at rank 2 only (the other beyond the list)
    ranks, listed, relevant = np.array([1, 3, 6, 2]), np.array([3, 1]), np.array([3, 2])
    at5 = metrics.truncated_average_precision(ranks, listed, relevant, 5)
    np.testing.assert_allclose(at5, [(1 + 2 / 3) / 3, (1 / 2) / 2])
    at_r = metrics.truncated_average_precision(ranks, listed, relevant, relevant)  # MAP@R's terms
    np.testing.assert_allclose(at_r, [(1 + 2 / 3) / 3, (1 / 2) / 2])
    np.testing.assert_allclose(metrics.truncated_average_precision(ranks, listed, relevant, 10),
                               [(1 + 2 / 3 + 3 / 6) / 3, (1 / 2) / 2])
    np.testing.assert_allclose(metrics.truncated_average_precision(ranks[:1], [1], [1], 1), [1.0])  # min(R, k)
    assert np.isnan(metrics.truncated_average_precision(np.zeros(0), [0], [0], 5)[0])
    with pytest.raises(ValueError):
        metrics.truncated_average_precision(np.array([3, 3]), [2], [2], 5)  # ranks must be distinct


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_faiss_lists_and_metrics_equal_the_full_ranking_on_ties(leave_one_out):
    x, labels = tied_data()
    query, query_labels = (x, labels) if leave_one_out else (x[::3] + 0, labels[::3])
    full = per_query_scores(query, query_labels, x, labels, leave_one_out=leave_one_out, with_ap=False)
    found = search.search_scores(query, query_labels, x, labels, leave_one_out=leave_one_out, k=20)
    listed = full["first_rank"] <= len(x)  # every answerable query
    depth = search.search_depth(search.relevant_counts(query_labels, labels, leave_one_out=leave_one_out), 20)
    within = full["first_rank"] <= depth
    np.testing.assert_array_equal(found["first_rank"][within], full["first_rank"][within])
    assert np.isinf(found["first_rank"][listed & ~within]).all()
    for k in (1, 5, 20):  # CMC@k = Recall@K: the same number from both engines
        assert metrics.recall_at_k(found["first_rank"], k) == metrics.recall_at_k(full["first_rank"], k)
    # the truncated APs against a walk down the independent reference's lists
    num_relevant = search.relevant_counts(query_labels, labels, leave_one_out=leave_one_out)
    for n, ranked in enumerate(reference_lists(query, x, leave_one_out)):
        expected_k = reference_truncated_ap(labels[ranked], query_labels[n], num_relevant[n], 20)
        expected_r = reference_truncated_ap(labels[ranked], query_labels[n], num_relevant[n], num_relevant[n])
        assert found["ap_k"][n] == pytest.approx(expected_k, abs=1e-12)
        assert found["ap_r"][n] == pytest.approx(expected_r, abs=1e-12)


def test_a_tie_across_the_end_of_the_candidates_is_ranked_exactly():
    """200 identical best items: faiss cannot tell them apart, so the certificate fails and the query is
    ranked in numpy: the tie goes to the lowest gallery indices, as in the full ranking."""
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((1000, 16)).astype(np.float32)
    best = np.sort(rng.choice(1000, 200, replace=False))
    gallery[best] = 5.0
    query, gallery = truncate_and_normalize(np.full((3, 16), 5.0, dtype=np.float32), gallery)
    ranked, fallback = search.faiss_topk(query, gallery, 50)
    assert fallback == 3
    np.testing.assert_array_equal(ranked, np.tile(best[:50], (3, 1)))
    np.testing.assert_array_equal(ranked, search.exact_topk(query, gallery, 50))


def test_engine_switches_by_size_or_config():
    assert search.engine_for(SearchConfig(), 50000) == "exact"
    assert search.engine_for(SearchConfig(), 50001) == "faiss"
    assert search.engine_for(SearchConfig(engine="faiss"), 10) == "faiss"
    assert search.engine_for(SearchConfig(engine="exact", exact_max_gallery=1), 10**6) == "exact"


@pytest.fixture
def chain_store(tmp_path):
    """Three versions of a 300-item leave-one-out set; each version's vectors a perturbation of the last."""
    store = EmbeddingStore(tmp_path / "store")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 300)
    x = rng.standard_normal((10, 16))[labels] + rng.standard_normal((300, 16))
    for version in range(3):
        store.write("m", version, "test", x.astype(np.float32), labels, np.arange(300))
        x = x + 0.3 * rng.standard_normal(x.shape)
    return store


def rows_in_order(store, cfg, versions, indexes=None):
    """Rows 0..versions-1, each after the older ones (whose diagonal top-1 its flips compare with), as the driver does."""
    rows, earlier = [], []
    for version in range(versions):
        rows.append(compatibility_row(store, "m", version, cfg, earlier_top1=earlier, indexes=indexes))
        earlier.append(unpack_correct(rows[-1][TOP1_CORRECT]))
    return rows


def test_rows_through_faiss_agree_with_the_full_ranking(chain_store):
    exact = rows_in_order(chain_store, EvaluationConfig(), 3)
    topk = rows_in_order(chain_store, EvaluationConfig(search=SearchConfig(engine="faiss", k=10)), 3)
    assert {"cmc1", "cmc5", "cmc10", "map10", "mapR"} <= set(topk[2]) and "map" not in topk[2]
    for name in ("cmc1", "cmc5", TOP1_CORRECT, "nfr_new_old"):  # flips too: the same first ranks
        assert [row.get(name) for row in topk] == [row.get(name) for row in exact]


def test_an_index_is_built_once_and_searched_by_every_later_version(chain_store, tmp_path, monkeypatch):
    run = RunStorage.at(tmp_path / "run")
    cfg = EvaluationConfig(search=SearchConfig(k=10, index=SearchIndexConfig(type="ivf-flat", nlist=8, nprobe=8)))
    indexes = search.GalleryIndexes(run, cfg.search.index, cfg.search.k)
    real_build, built = search.build_index, []
    monkeypatch.setattr(search, "build_index",
                        lambda vectors, c, depth: built.append(len(built)) or real_build(vectors, c, depth=depth))

    def stamp(version):  # the stored artefact's SHA-256 and modification time, through the run storage
        key = search.GalleryIndexes.key("m", version, "test")
        return run.artefact(key).sha256, run.filesystem.get_file_info(run.path(key)).mtime_ns

    row0, = rows_in_order(chain_store, cfg, 1, indexes)
    # a full scan of the cells (nprobe = nlist) finds what the exact search finds
    assert row0["index_cmc1"] == row0["cmc1"] and row0["index_cmc5"] == row0["cmc5"]
    first = stamp(0)
    _, row1 = rows_in_order(chain_store, cfg, 2, indexes)
    second = stamp(1)
    *_, row2 = rows_in_order(chain_store, cfg, 3, indexes)
    assert len(built) == 3  # one per gallery version, at its first use
    assert (stamp(0), stamp(1)) == (first, second)  # never rebuilt, never rewritten
    assert run.list("indexes") == ["m/v0/test.faiss", "m/v1/test.faiss", "m/v2/test.faiss"]
    assert len(row1["index_map10"]) == 2 and len(row2["index_mapR"]) == 3


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_approximate_indexes_search_their_gallery(chain_store, kind):
    table = chain_store.read("m", 0, "test")
    cfg = SearchIndexConfig(type=kind, nlist=4, nprobe=4, pq_m=4, pq_bits=4)
    index = search.build_index(search._normalized(table.embeddings), cfg)
    scores = search.index_scores(index, cfg, table.embeddings, table.labels, table.labels, leave_one_out=True, k=10)
    exact = search.search_scores(table.embeddings, table.labels, table.embeddings, table.labels,
                                 leave_one_out=True, k=10)
    assert search.summarize(scores, 10)["cmc1"] >= 0.8 * search.summarize(exact, 10)["cmc1"]


def test_an_index_that_cannot_hold_the_gallery_is_a_config_error():
    from orchestrator.engine.validate import load_experiment

    with pytest.raises(ConfigError) as err:
        load_experiment("quickstart", ["evaluation.search.index={type: ivf-pq, pq_m: 48}"])
    assert err.value.key == "evaluation.search.index.pq_m"
    with pytest.raises(ConfigError) as err:
        load_experiment("quickstart", ["evaluation.search.index={type: ivf-flat, nlist: 4, nprobe: 8}"])
    assert err.value.key == "evaluation.search.index.nprobe"
    with pytest.raises(ConfigError) as err:
        load_experiment("quickstart", ["evaluation.search.engine=faiss", "evaluation.primary=map"])
    assert err.value.key == "evaluation.primary"
    with pytest.raises(ConfigError) as err:  # found when the index is built, before it is written
        search.build_index(np.eye(8, dtype=np.float32), SearchIndexConfig(type="ivf-flat", nlist=16, nprobe=4))
    assert err.value.key == "evaluation.search.index.nlist"


def test_a_damaged_index_is_an_error_that_says_what_to_do(chain_store, tmp_path):
    run = RunStorage.at(tmp_path / "run")
    run.write_bytes(search.GalleryIndexes.key("m", 0, "test"), b"not an index")
    with pytest.raises(DataError, match="delete it and run again with --resume"):
        search.GalleryIndexes(run, SearchIndexConfig(), 10).get("m", 0, "test", chain_store.read("m", 0, "test"))


def test_list_recall_by_hand():
    found = np.array([[3, 1, 7], [5, -1, -1]])
    exact = np.array([[1, 2, 3], [5, 6, -1]])
    assert search.list_recall(found, exact) == pytest.approx((2 / 3 + 1 / 2) / 2)
    rng = np.random.default_rng(0)  # many lists, short ones padded with -1, against Python sets
    found = np.stack([rng.permutation(60)[:20] for _ in range(300)])
    exact = np.stack([rng.permutation(60)[:20] for _ in range(300)])
    found[::7, 15:] = exact[::5, 12:] = -1
    by_sets = np.mean([len(set(f) & set(e) - {-1}) / len(set(e) - {-1}) for f, e in zip(found.tolist(), exact.tolist())])
    assert search.list_recall(found, exact) == pytest.approx(by_sets)


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_a_tuned_index_is_the_cheapest_that_reaches_the_target_recall(kind):
    """1000 gallery vectors: the tuning sample is the whole gallery, so the recall can be recomputed here
    from float64 numpy lists and Python sets at the tuned value and at the next cheaper one."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32))
    gallery = centres[np.arange(1000) % 40] + 1.2 * rng.standard_normal((1000, 32))
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
    cfg = SearchIndexConfig(type=kind, nlist=64, hnsw_m=4, ef_construction=8, target_recall=0.9)
    index = search.build_index(gallery, cfg, depth=20)
    exact = np.argsort(-(gallery.astype(np.float64) @ gallery.T.astype(np.float64)), axis=1, kind="stable")[:, :20]

    def recall(value):
        if kind == "hnsw":
            index.hnsw.efSearch = value
        else:
            faiss.extract_index_ivf(index).nprobe = value
        found = index.search(gallery, 20)[1]
        return np.mean([len(set(f) & set(e)) / 20 for f, e in zip(found.tolist(), exact.tolist())])

    tuned = index.hnsw.efSearch if kind == "hnsw" else faiss.extract_index_ivf(index).nprobe
    cheaper = tuned // 2
    assert recall(tuned) >= 0.9 and (cheaper < (20 if kind == "hnsw" else 1) or recall(cheaper) < 0.9), tuned
    explicit = search.build_index(gallery, SearchIndexConfig(type="ivf-flat", nlist=64, nprobe=5), depth=20)
    assert faiss.extract_index_ivf(explicit).nprobe == 5  # a value given in the config is kept, never tuned
    with pytest.raises(ConfigError, match="target_recall"):
        SearchIndexConfig(target_recall=0)
