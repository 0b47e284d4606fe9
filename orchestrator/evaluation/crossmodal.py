"""Cross-modal Recall@K of a finished run, from the store only (the cross-modal protocol), and metrics.json.

Cells: old->old (old queries, old gallery), new->new (base new model re-indexed), and per method and
seed new->old (the method's projected queries against the old gallery, which is read, never re-encoded).
A method is compatible on a metric when new->old beats old->old (the ECC of :mod:`orchestrator.evaluation.metrics`).
"""

from __future__ import annotations


import numpy as np

from orchestrator.evaluation import metrics as M
from orchestrator.storage import runfiles
from orchestrator.storage.runfiles import CROSSMODAL_VERSIONS as VERSIONS, seed_dir
from orchestrator.config.crossmodal import CrossModalExperiment
from orchestrator.errors import StoreError
from orchestrator.evaluation import cross_modal_recall
from orchestrator.storage.store import EmbeddingStore, EmbeddingTable


def _sides(store: EmbeddingStore, key: str) -> dict[str, EmbeddingTable]:
    return {name: store.read(key, VERSIONS.get(key, 1), name) for name in ("images", "captions")}


def recall(queries: dict[str, EmbeddingTable], gallery: dict[str, EmbeddingTable], ks: list[int]) -> dict[str, float]:
    """I2T and T2I Recall@K (fractions) of ``queries`` against ``gallery``; both hold the same images
    and captions in the same order (checked by sample id)."""
    for name in ("images", "captions"):
        if not np.array_equal(queries[name].sample_ids, gallery[name].sample_ids):
            raise StoreError(f"the query and gallery {name} list different samples; re-run the affected steps")
    return cross_modal_recall(queries["images"].embeddings, gallery["captions"].embeddings,
                              gallery["captions"].caption_of, queries["captions"].embeddings,
                              gallery["images"].embeddings, ks)


def gap_sigma(tables: dict[str, EmbeddingTable]) -> float:
    """Per-coordinate RMS of (image - caption) over matching pairs: the noise sigma of stage text that
    matches a model's measured image-text gap (a diagnostic for choosing ``noise_sigma``)."""
    images, captions = tables["images"].embeddings, tables["captions"].embeddings
    difference = images[tables["captions"].caption_of] - captions
    return float(np.sqrt(np.mean(difference.astype(np.float64) ** 2)))


def compatible(new_old: float, old_old: float, ties: str) -> bool:
    """ECC on one metric: new->old against the old self-test, by the one pair rule of metrics.py."""
    return bool(M.ecc_holds(new_old, old_old, ties))


def evaluate_run(cfg: CrossModalExperiment, run_dir: runfiles.Run) -> dict:
    """metrics.json content: the reference cells, then per method per seed, mean, std and the ticks."""
    ks, ties = cfg.evaluation.ks, cfg.evaluation.ties
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    old, new = _sides(store, "old"), _sides(store, "new")
    old_old, new_new = recall(old, old, ks), recall(new, new, ks)
    names = list(old_old)
    out: dict = {"schema_version": 1, "kind": cfg.kind, "experiment": cfg.name, "config_digest": cfg.digest(),
                 "seeds": cfg.seeds, "metrics": names, "ties": ties, "method_order": [m.key for m in cfg.methods],
                 "models": {role: getattr(cfg.models, role).name for role in ("old", "new")},
                 "gap_sigma": {"old": gap_sigma(old), "new": gap_sigma(new)},
                 "old_old": old_old, "new_new": new_new, "methods": {}}
    for spec in cfg.methods:
        per_seed = {str(seed): recall(_sides(EmbeddingStore(runfiles.store_dir(seed_dir(run_dir, seed))), spec.key), old, ks)
                    for seed in cfg.seeds}
        values = {name: np.array([cell[name] for cell in per_seed.values()]) for name in names}
        mean = {name: float(v.mean()) for name, v in values.items()}
        out["methods"][spec.key] = {
            "method": spec.name, "params": _method_params(run_dir, cfg.seeds[0], spec.key), "per_seed": per_seed, "mean": mean,
            "std": {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for name, v in values.items()},
            "compatible": {name: compatible(mean[name], old_old[name], ties) for name in names},
            "compatible_seeds": {name: int(sum(compatible(v, old_old[name], ties) for v in values[name]))
                                 for name in names},
        }
    return out


def _method_params(run_dir: runfiles.Run, seed: int, key: str) -> dict:
    """The method's recorded choices (every stage's manifest entry holds the same record)."""
    run = runfiles.storage(run_dir)
    prefix = runfiles.task_manifest_key(f"seed-{seed}/{key}").removesuffix(".json")
    entries = [name for name in run.list(prefix) if "/" not in name and name.endswith(".json")]
    return run.read_json(f"{prefix}/{entries[0]}").get("params", {}) if entries else {}
