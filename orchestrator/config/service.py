"""The optional ``service:`` section: simulate a retrieval service's mixed gallery and partial backfills."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from orchestrator.config.typed import require

BackfillPolicy = Literal["random", "oldest", "popular", "uncertainty", "class-balanced"]


@dataclass
class PopularityConfig:
    """Which items the service's users query: a Zipf popularity over the gallery items (the query log
    the `popular` backfill policy orders by)."""

    zipf: float = 1.0  # exponent s: the item of popularity rank r is queried with weight 1/r^s
    queries_per_step: int = 1000  # queries logged during each step, drawn among the items present then

    def __post_init__(self):
        require(self.zipf >= 0, "zipf", f"must be >= 0 (0: every item equally popular), got {self.zipf}")
        require(self.queries_per_step >= 1, "queries_per_step", "must be >= 1")


@dataclass
class ServiceConfig:
    """A retrieval service's life over the run's versions, evaluated from the stored embeddings (no model
    runs again): the gallery grows per step, each item keeps the embedding of the version live at its
    arrival, and each upgrade re-embeds (backfills) a budget of it by a policy (docs/guide/service.md)."""

    # per step, the chance that an evaluation item of a class trained so far (not yet in the gallery)
    # arrives; 1: every item arrives with the step that first trains its class
    arrival_rate: float = 1.0
    # backfill budgets to evaluate, each in % of the gallery re-embedded per upgrade (0: none, 100: all)
    budgets: list[float] = field(default_factory=lambda: [float(b) for b in range(0, 101, 10)])
    # random, oldest (oldest embedding first), popular (most-queried first; needs popularity),
    # uncertainty (largest disagreement between the new and the stored embedding first), class-balanced
    policies: list[BackfillPolicy] = field(default_factory=lambda: ["random", "oldest", "uncertainty", "class-balanced"])
    popularity: Optional[PopularityConfig] = None  # the query distribution (needed by the popular policy)
    seed: Optional[int] = None  # arrivals, random orders and the query log; None: the experiment's seed

    def __post_init__(self):
        require(0 < self.arrival_rate <= 1, "arrival_rate", f"must be in (0, 1], got {self.arrival_rate}")
        require(bool(self.budgets), "budgets", "needs at least one budget")
        for index, budget in enumerate(self.budgets):
            require(0 <= budget <= 100, f"budgets.{index}", f"must be a percentage in [0, 100], got {budget}")
        require(bool(self.policies), "policies", "needs at least one backfill policy")
        require(len(set(self.policies)) == len(self.policies), "policies", f"lists a policy twice: {self.policies}")
        require("popular" not in self.policies or self.popularity is not None, "policies",
                "'popular' (most-queried first) needs a query distribution: set service.popularity "
                "(e.g. {zipf: 1.0}) or drop the policy")
