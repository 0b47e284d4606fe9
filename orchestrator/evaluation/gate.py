"""The release gate: whether a candidate model may serve queries against a gallery embedded by the live
model, with confidence intervals (``compat check`` and every run's report; the command and its inputs
are :mod:`orchestrator.engine.check`).

Three retrieval cells are scored per query: old/old (the gallery model's own pair), new/old (candidate
queries against the old gallery) and new/new. The gate holds when, on CMC top-1 and on mAP, the lower
bound of the paired-bootstrap interval of new/old - old/old is above 0 (at or above 0 with ties passing).
A candidate whose method upgrades stored vectors (an old-to-new map per version) searches the old gallery
after the maps of the versions in between have transformed it, exactly as the run's compatibility matrix
does; those maps are only known within one run and method, so such a candidate is refused against any
other gallery. This layer does not know which methods upgrade vectors: callers hand it the engine's
upgrade function (``upgrade_of``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from orchestrator.config import EvaluationConfig
from orchestrator.errors import DataError, RunError
from orchestrator.evaluation import metrics
from orchestrator.evaluation.retrieval import Upgrade, per_query_scores
from orchestrator.evaluation.standalone import split_sides
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage
from orchestrator.storage.store import EmbeddingStore

COMPATIBLE, INCOMPATIBLE = 0, 1  # bad input exits with the CLI's error code, 2
GATED = ("cmc1", "map")  # the metrics whose ECC decides the verdict
# The command's defaults, which are also what every run's report uses (see version_gates).
CONFIDENCE, RESAMPLES, SEED, MIN_CLASS_QUERIES = 0.95, 1000, 0, 10
# (run, method, version) -> how galleries of older versions are upgraded before that version's queries
# search them, or None when the method does not upgrade stored vectors
UpgradeOf = Callable[[RunStorage, str, int], Optional[Upgrade]]


@dataclass(frozen=True)
class Side:
    """One model's embeddings of the evaluation data: queries and gallery (the same rows for leave-one-out)."""

    source: str  # what the user passed, for messages
    protocol: Optional[str]  # a run's own protocol; None for a file (the --protocol flag decides)
    query: tuple[np.ndarray, np.ndarray]  # embeddings, labels
    gallery: tuple[np.ndarray, np.ndarray]
    query_ids: Optional[np.ndarray] = None  # sample ids where a store gave them
    gallery_ids: Optional[np.ndarray] = None
    split: Optional[np.ndarray] = None  # a file's split column (its rows are the query and the gallery until split)
    version_of: Optional[tuple[RunStorage, str, int]] = None  # (run, method, version) where a run gave it

    def under(self, protocol: str) -> "Side":
        """The side as ``protocol`` sees it: a file's rows separated by its split column for query-gallery
        (an error naming the file without one); leave-one-out ranks every row against the others."""
        if self.protocol is not None or protocol == "leave-one-out":
            return self
        sides = split_sides(Path(self.source), (*self.query, self.split))
        return replace(self, query=sides["query"], gallery=sides["gallery"])


# -- the pure parts --------------------------------------------------------------------------------
def class_breaks(labels: np.ndarray, old_correct: np.ndarray, new_correct: np.ndarray,
                 min_queries: int) -> list[dict]:
    """Classes with at least ``min_queries`` queries whose top-1 under new/old is below old/old, the
    largest drop first: where a gallery served to the candidate loses.

    Per class a tie is not a break (a class both models get 100 % right cannot do better), so the
    per-class rule is a strict drop whatever ``--ties`` says about the overall verdict."""
    labels = np.asarray(labels)
    old_correct, new_correct = np.asarray(old_correct, dtype=bool), np.asarray(new_correct, dtype=bool)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    old_top1 = np.bincount(inverse, weights=old_correct) / counts
    new_top1 = np.bincount(inverse, weights=new_correct) / counts
    flips = np.bincount(inverse, weights=metrics.negative_flips(old_correct, new_correct))
    broken = (counts >= min_queries) & ~metrics.ecc_holds(new_top1, old_top1, ties="pass")
    found = [{"label": int(classes[c]), "queries": int(counts[c]), "old_old": float(old_top1[c]),
              "new_old": float(new_top1[c]), "negative_flips": int(flips[c])} for c in np.flatnonzero(broken)]
    return sorted(found, key=lambda b: (b["new_old"] - b["old_old"], b["label"]))


def gate(old: Side, new: Side, protocol: str, *, confidence: float, resamples: int, seed: int,
         ties: metrics.Ties, min_class_queries: int, upgraded_gallery: Optional[np.ndarray] = None) -> dict:
    """The gate's result (the JSON ``compat check --json`` prints): scores of the three cells, the
    bootstrap intervals of new/old - old/old and of both negative-flip rates, the per-class breaks and
    ``compatible``. Sides must have passed :func:`check_sides`. ``upgraded_gallery``: the old gallery's
    vectors as the candidate's queries search them (see :func:`upgraded_old_gallery`); None: as stored."""
    leave_one_out = protocol == "leave-one-out"
    served = old.gallery if upgraded_gallery is None else (upgraded_gallery, old.gallery[1])
    cells = {name: per_query_scores(*q.query, *g, leave_one_out=leave_one_out)
             for name, q, g in (("old_old", old, old.gallery), ("new_old", new, served), ("new_new", new, new.gallery))}
    answerable = ~np.isnan(cells["old_old"]["first_rank"])  # the same queries in every cell (same labels)
    if not answerable.any():
        raise DataError("no query has a relevant gallery item (queries and gallery share no label)")
    top1 = {name: cell["first_rank"][answerable] == 1 for name, cell in cells.items()}
    ap = {name: cell["ap"][answerable] for name, cell in cells.items()}
    rows = np.stack([top1["new_old"].astype(float) - top1["old_old"], ap["new_old"] - ap["old_old"],
                     metrics.negative_flips(top1["old_old"], top1["new_old"]),
                     metrics.negative_flips(top1["old_old"], top1["new_new"])])
    mean, low, high = metrics.paired_bootstrap(rows, resamples=resamples, confidence=confidence, seed=seed)
    interval = [{"estimate": float(m), "low": float(lo), "high": float(hi)} for m, lo, hi in zip(mean, low, high)]
    difference = {"cmc1": interval[0], "map": interval[1]}
    verdicts = {name: bool(metrics.ecc_holds(difference[name]["low"], 0.0, ties)) for name in GATED}
    first_rank = {name: cell["first_rank"][answerable] for name, cell in cells.items()}
    scores = {name: {"cmc1": float(top1[name].mean()), "cmc5": metrics.recall_at_k(first_rank[name], 5),
                     "map": float(ap[name].mean())} for name in cells}
    return {
        "old": old.source, "new": new.source, "protocol": protocol, "queries": int(answerable.sum()),
        "old_gallery_upgraded": upgraded_gallery is not None,
        "confidence": confidence, "resamples": resamples, "seed": seed, "ties": ties,
        **scores,
        "difference": difference,
        "negative_flip_rate": {"new_old": interval[2], "new_new": interval[3]},
        "ecc": verdicts,
        "class_breaks": class_breaks(old.query[1][answerable], top1["old_old"], top1["new_old"], min_class_queries),
        "min_class_queries": min_class_queries,
        "compatible": all(verdicts.values()),
    }


# -- inputs ----------------------------------------------------------------------------------------


def stored_side(run: RunStorage, evaluation: EvaluationConfig, method: str, version: int, source: str) -> Side:
    """A finished version's stored embeddings of the run's evaluation sets, under the run's protocol."""
    store = EmbeddingStore(runfiles.store_dir(run))
    query = store.read(method, version, evaluation.query)
    gallery = query if evaluation.protocol == "leave-one-out" else store.read(method, version, evaluation.gallery)
    return Side(source, evaluation.protocol, (query.embeddings, query.labels),
                (gallery.embeddings, gallery.labels), query.sample_ids, gallery.sample_ids,
                version_of=(run, method, version))


def upgraded_old_gallery(old: Side, new: Side, upgrade_of: UpgradeOf) -> Optional[np.ndarray]:
    """The old gallery's vectors upgraded into the candidate's space, when the candidate is a version whose
    method upgrades stored vectors (None otherwise: the candidate searches them as stored). The maps are
    the run's, so the old side must be the same or an older version of the same run and method."""
    if new.version_of is None:
        return None
    run, method, version = new.version_of
    upgrade = upgrade_of(run, method, version)
    if upgrade is None:
        return None
    if old.version_of is None or old.version_of[:2] != (run, method) or old.version_of[2] > version:
        raise RunError(f"--new {new.source} searches stored galleries only after its method's maps have upgraded "
                       "them (old-to-new), and those maps reach no gallery outside that run and method: pass "
                       f"--old {run.location} --old-method {method} --old-version K with K <= {version}")
    if old.version_of[2] == version:
        return None
    return upgrade(old.version_of[2], version, old.gallery[0])


def version_gates(run: RunStorage, evaluation: EvaluationConfig, method: str, num_versions: int,
                  upgrade_of: UpgradeOf) -> list[dict]:
    """The gate of every upgrade of one method of a run (each version against the one before it, and
    the newest against version 0): what ``compat check`` on the run directory prints with its default
    confidence, resamples, seed and class threshold and ``--ties`` set to the run's ``evaluation.ties``,
    read from the stored vectors. Each entry is that JSON with ``new_version``/``old_version`` in place
    of the two sources."""
    @functools.lru_cache(maxsize=3)  # consecutive pairs share a version; a long chain is not held at once
    def side(version: int) -> Side:
        return stored_side(run, evaluation, method, version, f"{method} v{version}")

    entries = []
    for new, old in metrics.upgrade_pairs(num_versions):
        check_sides(side(old), side(new), evaluation.protocol)
        result = gate(side(old), side(new), evaluation.protocol, confidence=CONFIDENCE, resamples=RESAMPLES,
                      seed=SEED, ties=evaluation.ties, min_class_queries=MIN_CLASS_QUERIES,
                      upgraded_gallery=upgraded_old_gallery(side(old), side(new), upgrade_of))
        entries.append({"new_version": new, "old_version": old,
                        **{k: v for k, v in result.items() if k not in ("old", "new")}})
    return entries


def check_sides(old: Side, new: Side, protocol: str) -> None:
    """The same queries and the same gallery items on both sides (lengths, labels row by row, and sample
    ids where both come from stores), before anything is ranked."""
    for part in ("query", "gallery"):
        (_, old_labels), (_, new_labels) = getattr(old, part), getattr(new, part)
        what = "rows" if protocol == "leave-one-out" else f"{part} rows"
        if len(old_labels) != len(new_labels):
            raise DataError(f"{old.source} has {len(old_labels)} {what} and {new.source} has {len(new_labels)}; "
                            f"both models must embed the same {part} items")
        if not np.array_equal(old_labels, new_labels):
            row = int(np.flatnonzero(old_labels != new_labels)[0])
            raise DataError(f"{old.source} and {new.source} list different labels ({what}, first at row {row}); "
                            f"both models must embed the same {part} items in the same order")
        old_ids, new_ids = getattr(old, f"{part}_ids"), getattr(new, f"{part}_ids")
        if old_ids is not None and new_ids is not None and not np.array_equal(old_ids, new_ids):
            raise DataError(f"{old.source} and {new.source} hold different {part} samples (sample ids differ); "
                            "compare versions that embedded the same evaluation set")


