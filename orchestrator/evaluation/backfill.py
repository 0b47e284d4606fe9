"""A retrieval service's gallery over its model upgrades: which version embedded each item at each step.

Pure numpy bookkeeping, no vectors. Each gallery item arrives at some step (:func:`arrival_steps`) and
is embedded by the version live then; at every upgrade (step t >= 1) the operator may re-embed
("backfill") up to B % of the gallery with version t, choosing the items by a policy. The result is
the served version of every item at every step (:func:`simulate`): everything a mixed-gallery
evaluation needs to pick, per item, one row of the stored partitions.

Why the selections stay cheap to evaluate: an item is embedded at most once per version, and every
version embeds every evaluation item into the store already, so any (policy, budget) is a per-item
choice among stored vectors.

Budget: floor(B/100 x gallery size at step t) items per upgrade, among the stale ones (present, served by
an older version; items arriving at t are embedded by t already). B = 0 is "no backfill", B = 100 is
"full backfill at every step".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

NOT_PRESENT = -1  # served version of an item that has not arrived yet
# Every random draw of the simulation has its own stream, numpy.random.default_rng([seed, STREAM, ...]),
# so no two of them (arrivals, the query log, the orders of two policies) are the same permutation.
ARRIVALS, QUERY_LOG, RANDOM_ORDER, CLASS_ORDER = range(4)
POLICIES = ("random", "oldest", "popular", "uncertainty", "class-balanced")

# A policy's order of the stale items at one step: priority keys, lower first (ties: lower item index).
Priority = Callable[[int, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ServiceHistory:
    """One simulated life of the gallery: ``served[t, k]`` the version serving item k at step t
    (:data:`NOT_PRESENT` before it arrives); ``backfilled[t]`` items re-embedded at step t (the forward
    passes spent); ``stale[t]`` items a full backfill would re-embed at step t."""

    served: np.ndarray  # int (T, N)
    backfilled: np.ndarray  # int (T,)
    stale: np.ndarray  # int (T,)

    @property
    def backfill_fraction(self) -> float:
        """Re-embedded items over all upgrades as a share of what full backfill re-embeds (1 without any upgrade work)."""
        total = int(self.stale.sum())
        return float(self.backfilled.sum() / total) if total else 1.0

    @property
    def passes_saved(self) -> int:
        """Forward passes saved against full backfill at every step."""
        return int(self.stale.sum() - self.backfilled.sum())


def arrival_steps(first_step: np.ndarray, num_steps: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Step at which each item enters the gallery: items whose class a step first trains on
    (``first_step[k]``) arrive from that step on, each pending item with probability ``rate`` per step
    (rate 1: all at once). Items still pending after the last step never arrive (:data:`NOT_PRESENT`),
    and so do items of classes no step trains on (``first_step >= num_steps``)."""
    if not 0 < rate <= 1:
        raise ValueError(f"arrival rate must be in (0, 1], got {rate}")
    first_step = np.asarray(first_step, dtype=np.int64)
    delay = rng.geometric(rate, size=first_step.shape) - 1 if rate < 1 else np.zeros_like(first_step)
    arrival = first_step + delay
    return np.where(arrival < num_steps, arrival, NOT_PRESENT)


def budget_items(budget_percent: float, gallery_size: int) -> int:
    """Items one upgrade may re-embed: floor(B/100 x gallery size), exact for integer percentages."""
    if not 0 <= budget_percent <= 100:
        raise ValueError(f"budget must be a percentage in [0, 100], got {budget_percent}")
    return int(np.floor(budget_percent * gallery_size / 100 + 1e-9))


def simulate(arrival: np.ndarray, num_steps: int, budget_percent: float, priority: Priority) -> ServiceHistory:
    """The served version of every item at every step under one policy and budget.

    Step 0 serves every item present with version 0. At step t >= 1 items arriving at t get version t,
    the others keep their version, then the :func:`budget_items` stale items first in ``priority(t,
    served_before)`` order (lower key first, ties to the lower index) are re-embedded with version t.
    """
    arrival = np.asarray(arrival, dtype=np.int64)
    served = np.full((num_steps, len(arrival)), NOT_PRESENT, dtype=np.int64)
    backfilled = np.zeros(num_steps, dtype=np.int64)
    stale_counts = np.zeros(num_steps, dtype=np.int64)
    for step in range(num_steps):
        current = served[step - 1].copy() if step else served[0]
        current[arrival == step] = step
        stale = np.flatnonzero((current != NOT_PRESENT) & (current < step))
        stale_counts[step] = len(stale)
        count = min(budget_items(budget_percent, int(np.count_nonzero(current != NOT_PRESENT))), len(stale))
        if count == len(stale):  # everything stale: no order needed
            current[stale] = step
        elif count:
            keys = np.asarray(priority(step, served[step - 1]), dtype=np.float64)[stale]
            current[stale[_first(keys, count)]] = step
        backfilled[step] = count
        served[step] = current
    return ServiceHistory(served, backfilled, stale_counts)


def _first(keys: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` lowest keys, ties to the lower position (a partition, not a sort)."""
    kth = np.partition(keys, count - 1)[count - 1]
    below = np.flatnonzero(keys < kth)
    return np.concatenate([below, np.flatnonzero(keys == kth)[:count - len(below)]])


# -- policies: each maps (step, served versions before the step) to priority keys over all items -------------
def random_priority(seed: int) -> Priority:
    """A fresh seeded random order at every step."""
    def priority(step: int, served: np.ndarray) -> np.ndarray:
        keys = np.empty(len(served))
        keys[np.random.default_rng([seed, RANDOM_ORDER, step]).permutation(len(served))] = np.arange(len(served))
        return keys

    return priority


def oldest_priority(arrival: np.ndarray) -> Priority:
    """Oldest embedding first: the lowest serving version, then the earliest arrival."""
    arrival = np.asarray(arrival, dtype=np.float64)
    return lambda step, served: served * (arrival.max(initial=0) + 1) + arrival


def popular_priority(query_counts: np.ndarray) -> Priority:
    """Most-queried first: ``query_counts[t, k]`` queries that hit item k during step t; the order at
    an upgrade counts every query logged before it."""
    logged = np.cumsum(np.asarray(query_counts, dtype=np.float64), axis=0)
    return lambda step, served: -logged[step - 1]


def uncertainty_priority(disagreement: Callable[[int, np.ndarray], np.ndarray]) -> Priority:
    """FastFill-style: the items whose stored embedding disagrees most with the new version's first.
    ``disagreement(t, served)`` gives, per item, 1 - cos(embedding by version t, embedding by ``served[k]``)."""
    return lambda step, served: -np.asarray(disagreement(step, served), dtype=np.float64)


def class_balanced_priority(labels: np.ndarray, seed: int) -> Priority:
    """The budget spread evenly over classes: round robin over the classes, each class's items in a
    seeded random order (a class with no stale item left drops out, the others fill the budget)."""
    labels = np.asarray(labels)

    _, class_index = np.unique(labels, return_inverse=True)
    num_classes = int(class_index.max(initial=-1)) + 1

    def priority(step: int, served: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([seed, CLASS_ORDER, step])
        order = rng.permutation(len(labels))
        order = order[(served[order] != NOT_PRESENT) & (served[order] < step)]  # the stale items, shuffled
        grouped = order[np.argsort(class_index[order], kind="stable")]  # by class, shuffled within each
        starts = np.searchsorted(class_index[grouped], class_index[grouped])  # each class's first position
        keys = np.full(len(labels), np.inf)
        class_rank = rng.permutation(num_classes)  # which class goes first in every round
        keys[grouped] = (np.arange(len(grouped)) - starts) * num_classes + class_rank[class_index[grouped]]
        return keys

    return priority


def zipf_query_counts(present: np.ndarray, exponent: float, queries_per_step: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Query log of a Zipf-popular gallery: each item gets a popularity rank (a seeded permutation) and
    weight 1/rank^exponent; each step draws ``queries_per_step`` queries among the items present then.
    ``present``: bool (T, N), item k present at step t. Returns counts (T, N)."""
    present = np.asarray(present, dtype=bool)
    weights = 1.0 / np.power(rng.permutation(present.shape[1]) + 1.0, exponent)
    counts = np.zeros(present.shape, dtype=np.int64)
    for step, mask in enumerate(present):
        if mask.any():
            p = np.where(mask, weights, 0.0)
            counts[step] = rng.multinomial(queries_per_step, p / p.sum())
    return counts


def priority_for(policy: str, *, arrival: np.ndarray, labels: np.ndarray, seed: int,
                 query_counts: Optional[np.ndarray] = None,
                 disagreement: Optional[Callable[[int, np.ndarray], np.ndarray]] = None) -> Priority:
    """The priority of a named policy (one of :data:`POLICIES`) with the data it needs."""
    if policy == "random":
        return random_priority(seed)
    if policy == "oldest":
        return oldest_priority(arrival)
    if policy == "popular":
        if query_counts is None:
            raise ValueError("the 'popular' policy needs a query log (query_counts)")
        return popular_priority(query_counts)
    if policy == "uncertainty":
        if disagreement is None:
            raise ValueError("the 'uncertainty' policy needs the embeddings' disagreement")
        return uncertainty_priority(disagreement)
    if policy == "class-balanced":
        return class_balanced_priority(labels, seed)
    raise ValueError(f"unknown backfill policy {policy!r}; known: {', '.join(POLICIES)}")
