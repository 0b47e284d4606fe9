"""Mixed galleries: a retrieval service's gallery, each item served by the version that embedded it,
evaluated from the stored vectors (docs/guide/service.md).

At step t the queries come from version t and gallery item k is the stored row of version
``served[t, k]`` (orchestrator/evaluation/backfill.py decides it), so every (policy, budget) is a per-item
selection of rows the store already holds: nothing is embedded again. Where the method upgrades stored
vectors (an old-to-new map per version), the row of version j < t is first passed through the maps of
versions j+1..t, as the service would transform its store at each upgrade: a cheap transform, not a
forward pass, so the item still counts as served by version j. All selections of a step are
ranked together, with results equal to the exact ranking of
:func:`orchestrator.evaluation.retrieval.per_query_scores` on each assembled gallery.

Per step: CMC top-1/5 and mAP on the mixed gallery, and the negative-flip rate against the service of
the previous step (queries answered right at top-1 at step t-1 and wrong at step t, among the queries
asked at both steps: what users of the service see regress after an upgrade). Next to each policy's
curve: full backfill at every step (budget 100 %, the upper bound) and no backfill (budget 0 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from orchestrator.config import EvaluationConfig, ExperimentConfig, ServiceConfig
from orchestrator.errors import StoreError
from orchestrator.evaluation import backfill, metrics
from orchestrator.evaluation.retrieval import MapTies, Upgrade
from orchestrator.evaluation.selection_ranking import rank_selections

if TYPE_CHECKING:
    from orchestrator.storage.store import EmbeddingStore

QUALITY = ("cmc1", "cmc5", "map")  # per-step retrieval metrics; "nfr" is added from consecutive steps


@dataclass(frozen=True)
class StoredVersions:
    """Every version's embeddings of one method's query and gallery sets, in store order. With
    ``leave_one_out`` the two sets are the same samples and the queries at a step are the items present.
    ``upgrade(j, t, vectors)``, when given, is what version j's stored gallery vectors become once the
    service has upgraded its store to version t (the engine's
    :func:`~orchestrator.engine.gallery_upgrade.stored_vector_upgrade`); None: stored vectors are served
    as they are."""

    queries: Sequence[np.ndarray]  # per version (Nq, d)
    gallery: Sequence[np.ndarray]  # per version (Ng, d), as stored
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    leave_one_out: bool
    upgrade: Optional[Upgrade] = None
    gallery_ids: Optional[np.ndarray] = None  # sample ids of the gallery items (None: their positions)

    @classmethod
    def read(cls, store: "EmbeddingStore", method: str, num_versions: int, eval_cfg: EvaluationConfig,
             upgrade: Optional[Upgrade] = None) -> "StoredVersions":
        leave_one_out = eval_cfg.protocol == "leave-one-out"
        gallery_set = eval_cfg.query if leave_one_out else eval_cfg.gallery
        queries = [store.read(method, v, eval_cfg.query) for v in range(num_versions)]
        gallery = queries if leave_one_out else [store.read(method, v, gallery_set) for v in range(num_versions)]
        for tables in (queries, gallery):
            if any(not np.array_equal(t.sample_ids, tables[0].sample_ids) for t in tables):
                raise StoreError(f"the versions of {method!r} stored different samples of one evaluation set; "
                                 "re-encode it for every version")
        return cls([t.embeddings for t in queries], [t.embeddings for t in gallery], queries[0].labels,
                   gallery[0].labels, leave_one_out, upgrade, gallery[0].sample_ids)

    def served_gallery(self, version: int, step: int) -> np.ndarray:
        """The gallery vectors of ``version`` as the service holds them at ``step`` (upgraded into version
        ``step``'s space where the method upgrades stored vectors; computed once per pair)."""
        if self.upgrade is None or version >= step:
            return self.gallery[version]
        if (version, step) not in self._upgraded:
            self._upgraded[(version, step)] = self.upgrade(version, step, self.gallery[version])
        return self._upgraded[(version, step)]

    @cached_property
    def _upgraded(self) -> dict[tuple[int, int], np.ndarray]:
        return {}

    def disagreement(self, step: int, served: np.ndarray) -> np.ndarray:
        """Per gallery item: 1 - cos(its embedding by version ``step``, its vector as served: the embedding
        by ``served[k]``, upgraded to version ``step`` where the method upgrades stored vectors); 0 for
        items not present."""
        out = np.zeros(len(served))
        for version in np.unique(served[served != backfill.NOT_PRESENT]):
            items = np.flatnonzero(served == version)
            out[items] = 1 - self._cosines(step, int(version))[items]
        return out

    def _cosines(self, a: int, b: int) -> np.ndarray:
        """Per gallery item, the cosine between its embedding by version a and its vector of version b as
        served at step a (computed once)."""
        if (a, b) not in self._cosine_cache:
            unit = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)
                    for x in (np.asarray(self.served_gallery(v, a), dtype=np.float64) for v in (a, b))]
            self._cosine_cache[(a, b)] = np.einsum("ij,ij->i", *unit)
        return self._cosine_cache[(a, b)]

    @cached_property
    def _cosine_cache(self) -> dict[tuple[int, int], np.ndarray]:
        return {}


@dataclass(frozen=True)
class StepResult:
    """One step of one history: the metrics and, per query, whether it was asked and answered at top-1."""

    scores: dict[str, Optional[float]]
    asked: np.ndarray  # bool per query index
    correct: np.ndarray  # bool per query index: top-1 correct (False where not asked or unanswerable)


class MixedGalleryEvaluator:
    """Evaluates served-version histories of one method. At each step, every distinct selection among
    the histories is ranked once, all of them together (orchestrator/evaluation/selection_ranking.py):
    the references and the 0 % and 100 % budgets coincide, and one more budget costs a count over the
    items it serves differently, not another ranking from scratch."""

    def __init__(self, versions: StoredVersions, map_ties: MapTies = "lower-index"):
        self.versions, self.map_ties = versions, map_ties
        self.rankings = 0  # distinct (step, selection) pairs ranked

    def _rank_step(self, step: int, served_rows: list[np.ndarray]) -> list[StepResult]:
        """Every selection (served versions of step ``step``, one row each; the same items present)."""
        v = self.versions
        present = np.flatnonzero(served_rows[0] != backfill.NOT_PRESENT)
        num_queries = len(v.query_labels)
        if len(present) == 0:
            return [StepResult({name: None for name in QUALITY}, np.zeros(num_queries, bool),
                               np.zeros(num_queries, bool)) for _ in served_rows]
        served = np.stack([row[present] for row in served_rows])
        used = np.flatnonzero(np.bincount(served.ravel()))  # the versions serving some item
        position = np.zeros(used[-1] + 1, dtype=np.int64)
        position[used] = np.arange(len(used))
        queries = present if v.leave_one_out else np.arange(num_queries)
        ranked = rank_selections(v.queries[step][queries], v.query_labels[queries],
                                 [v.served_gallery(version, step)[present] for version in used], v.gallery_labels[present],
                                 position[served], leave_one_out=v.leave_one_out, map_ties=self.map_ties)
        self.rankings += len(served_rows)
        results = []
        for scores in ranked:
            asked, correct = np.zeros(num_queries, bool), np.zeros(num_queries, bool)
            asked[queries] = True
            first_rank = scores["first_rank"]
            correct[queries] = first_rank == 1  # NaN (no relevant item) compares False
            if np.isnan(first_rank).all():
                results.append(StepResult({name: None for name in QUALITY}, asked, correct))
                continue
            out = {f"cmc{k}": metrics.recall_at_k(first_rank, k) for k in (1, 5)}
            out["map"] = float(np.nanmean(scores["ap"]))
            results.append(StepResult(out, asked, correct))
        return results

    def histories(self, histories: Sequence[backfill.ServiceHistory]) -> list[list[dict]]:
        """Per history and step: the metrics, the negative-flip rate against the previous step (None at
        step 0), the gallery size and the items backfilled at that step."""
        num_steps = len(histories[0].served)
        by_step: list[dict[bytes, StepResult]] = []
        for step in range(num_steps):
            distinct = {h.served[step].tobytes(): h.served[step] for h in histories}
            by_step.append(dict(zip(distinct, self._rank_step(step, list(distinct.values())))))
        out = []
        for history in histories:
            rows, previous = [], None
            for step, served_row in enumerate(history.served):
                result = by_step[step][served_row.tobytes()]
                nfr = None
                if previous is not None:
                    both = previous.asked & result.asked
                    if both.any():
                        nfr = metrics.negative_flip_rate(previous.correct[both], result.correct[both])
                rows.append({**result.scores, "nfr": nfr,
                             "gallery": int(np.count_nonzero(served_row != backfill.NOT_PRESENT)),
                             "backfilled": int(history.backfilled[step])})
                previous = result
            out.append(rows)
        return out


def upgrade_mean(steps: list[dict], name: str) -> Optional[float]:
    """Mean of a per-step metric over the upgrades (steps >= 1), where defined."""
    values = [row[name] for row in steps[1:] if row.get(name) is not None]
    return float(np.mean(values)) if values else None


def curve_area(fractions: Sequence[float], values: Sequence[Optional[float]]) -> Optional[float]:
    """Area under quality against cumulative backfill fraction (trapezoids, points in budget order);
    over a curve from 0 to 1 it is the quality averaged over the backfill effort. None with a missing point
    or fewer than two distinct fractions."""
    if any(v is None for v in values) or len(set(fractions)) < 2:
        return None
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def served_versions_table(sample_ids: np.ndarray, labels: np.ndarray, arrival: np.ndarray,
                          histories: Sequence[tuple[str, float, backfill.ServiceHistory]]) -> pa.Table:
    """Which version served each gallery item at each step, one row per (item, step, policy, budget)
    (long layout: dictionary-encoded in Parquet, so the repeated columns cost little).
    ``histories``: (policy, budget percent, history); the references are the policies "full_backfill"
    (100) and "no_backfill" (0). ``arrival_step`` and ``served_version`` are -1 where the item has not
    arrived (:data:`~orchestrator.evaluation.backfill.NOT_PRESENT`)."""
    num_items = len(arrival)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in
                                            ("sample_id", "label", "arrival_step", "policy", "budget", "step", "served_version")}
    names: dict[str, int] = {}  # policy -> its code in the dictionary-encoded policy column
    for policy, budget, history in histories:
        num_steps = len(history.served)
        columns["sample_id"].append(np.tile(np.asarray(sample_ids, dtype=np.int64), num_steps))
        columns["label"].append(np.tile(np.asarray(labels, dtype=np.int64), num_steps))
        columns["arrival_step"].append(np.tile(np.asarray(arrival, dtype=np.int64), num_steps))
        columns["policy"].append(np.full(num_steps * num_items, names.setdefault(policy, len(names)), dtype=np.int32))
        columns["budget"].append(np.full(num_steps * num_items, float(budget)))
        columns["step"].append(np.repeat(np.arange(num_steps, dtype=np.int64), num_items))
        columns["served_version"].append(np.asarray(history.served, dtype=np.int64).ravel())
    types = {"policy": pa.int32(), "budget": pa.float64()}
    table = {name: pa.array(np.concatenate(parts) if parts else [], type=types.get(name, pa.int64()))
             for name, parts in columns.items()}
    table["policy"] = pa.DictionaryArray.from_arrays(table["policy"], pa.array(list(names), type=pa.string()))
    return pa.table(table)


def service_results(versions: StoredVersions, first_step: np.ndarray, num_steps: int, service: ServiceConfig,
                    seed: int, map_ties: MapTies = "lower-index",
                    on_served: Optional[Callable[[pa.Table], None]] = None) -> dict:
    """metrics.json's ``service`` entry of one method: both references per step, then per policy one
    point per budget (cumulative backfill fraction, forward passes used and saved, the mean over upgrades
    of every metric, the per-step rows) and the area under each metric's curve.

    ``first_step[k]``: the step that first trains gallery item k's class (num_steps: none does).
    ``on_served``, when given, receives every history's :func:`served_versions_table`."""
    seed = service.seed if service.seed is not None else seed
    arrival = backfill.arrival_steps(first_step, num_steps, service.arrival_rate, np.random.default_rng([seed, backfill.ARRIVALS]))
    query_counts = None
    if service.popularity is not None:
        present = np.array([(arrival != backfill.NOT_PRESENT) & (arrival <= t) for t in range(num_steps)])
        query_counts = backfill.zipf_query_counts(present, service.popularity.zipf,
                                                  service.popularity.queries_per_step, np.random.default_rng([seed, backfill.QUERY_LOG]))
    no_priority = backfill.random_priority(seed)  # any order: the references backfill nothing or everything
    runs = [("reference", "full_backfill", 100.0, no_priority), ("reference", "no_backfill", 0.0, no_priority)]
    for policy in service.policies:
        priority = backfill.priority_for(policy, arrival=arrival, labels=versions.gallery_labels, seed=seed,
                                         query_counts=query_counts, disagreement=versions.disagreement)
        runs += [("policy", policy, budget, priority) for budget in sorted(service.budgets)]
    histories = [backfill.simulate(arrival, num_steps, budget, priority) for _, _, budget, priority in runs]
    if on_served is not None:
        labels = versions.gallery_labels
        ids = np.arange(len(labels)) if versions.gallery_ids is None else versions.gallery_ids
        on_served(served_versions_table(ids, labels, arrival, [(name, budget, history) for (_, name, budget, _), history
                                                                in zip(runs, histories)]))
    evaluator = MixedGalleryEvaluator(versions, map_ties)
    out: dict = {"references": {}, "policies": {}}
    for (kind, name, budget, _), history, steps in zip(runs, histories, evaluator.histories(histories)):
        if kind == "reference":
            out["references"][name] = steps
            continue
        out["policies"].setdefault(name, {"points": []})["points"].append({
            "budget": budget, "backfill_fraction": history.backfill_fraction,
            "forward_passes": int(history.backfilled.sum()), "passes_saved": history.passes_saved,
            "mean": {metric: upgrade_mean(steps, metric) for metric in (*QUALITY, "nfr")}, "steps": steps})
    for curve in out["policies"].values():
        fractions = [p["backfill_fraction"] for p in curve["points"]]
        curve["area"] = {metric: curve_area(fractions, [p["mean"][metric] for p in curve["points"]])
                         for metric in (*QUALITY, "nfr")}
    out["gallery_items"] = int(np.count_nonzero(arrival != backfill.NOT_PRESENT))
    out["rankings"] = evaluator.rankings
    return out


def service_metrics(store: "EmbeddingStore", cfg: ExperimentConfig, num_versions: int, block_of_label: Optional[np.ndarray],
                    upgrade_of: Optional[Callable[[str], Optional[Upgrade]]] = None,
                    on_served: Optional[Callable[[str, pa.Table], None]] = None) -> dict:
    """metrics.json's ``service`` section of a run: the settings and :func:`service_results` per method.
    ``block_of_label[c]``: the step that first trains class c (None: every item may arrive from step 0).
    ``upgrade_of(method)``: how that method's stored vectors are upgraded between versions (see
    :class:`StoredVersions`), or None. ``on_served(method, table)``: where each method's
    :func:`served_versions_table` goes (None: nowhere)."""
    service, eval_cfg = cfg.service, cfg.evaluation
    out: dict = {"arrival_rate": service.arrival_rate, "budgets": sorted(service.budgets),
                 "policies": list(service.policies), "primary": eval_cfg.primary,
                 "methods": {}}
    for spec in cfg.methods:
        versions = StoredVersions.read(store, spec.key, num_versions, eval_cfg,
                                       None if upgrade_of is None else upgrade_of(spec.key))
        labels = versions.gallery_labels
        if block_of_label is None:
            first_step = np.zeros(len(labels), dtype=np.int64)
        else:  # labels beyond the table belong to no step
            known = labels < len(block_of_label)
            first_step = np.where(known, block_of_label[np.where(known, labels, 0)], num_versions)
        out["methods"][spec.key] = service_results(
            versions, first_step, num_versions, service, cfg.seed, eval_cfg.map_ties,
            None if on_served is None else (lambda table, method=spec.key: on_served(method, table)))
    return out
