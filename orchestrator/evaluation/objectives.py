"""Named numbers of a run, for sweep objectives, constraints and seed tables.

A name is read from one method's entry of metrics.json (or the same entry over the first versions
only, while a run is in progress), on one of its matrices:

=================  =======================================================================================
``AC AM BC FC``    the matrix's summary metrics (:mod:`orchestrator.evaluation.metrics`)
``M[i][j]``        a cell: queries of version i against the gallery of version j <= i
``margin[i][j]``   compatibility margin M[i][j] − M[j][j] of version i over version j < i (> 0: ECC holds;
                   = 0 is a tie, which holds only under ``evaluation.ties: pass``)
``min_margin``     the smallest margin over every pair j < i (> 0: ECC holds on every pair)
``accuracy``       classification accuracy of the newest version; ``accuracy[i]`` of version i
``Avg`` ``PD``     session average and performance drop of the accuracies (FSCIL)
``flagged``        how many versions the health check flags as under-trained on their new classes
                   (:mod:`orchestrator.evaluation.health`); ``"flagged <= 0"`` keeps a sweep to healthy trials
=================  =======================================================================================

Negative indexes count from the newest version (``M[-1][0]``: newest queries against the first
gallery), so a name keeps its meaning while a run grows. A name that a run does not define (yet) reads
as NaN. A constraint is ``"<name> <op> <number>"`` with op one of ``> >= < <=``; "ECC on every pair"
is ``"AC >= 1"`` (AC follows ``evaluation.ties``; ``"min_margin > 0"`` is the strict rule whatever it is).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

from orchestrator.evaluation import metrics as M
from orchestrator.errors import ConfigError

SUMMARY_NAMES = ("AC", "AM", "BC", "FC")
PLAIN_NAMES = (*SUMMARY_NAMES, "min_margin", "accuracy", "Avg", "PD", "flagged")
TABLE_NAMES = ("AC", "AM", "BC", "FC", "M[-1][-1]", "min_margin", "accuracy", "Avg")  # columns of seed and sweep tables
_INDEXED = re.compile(r"^(M|margin)\[(-?\d+)\]\[(-?\d+)\]$|^(accuracy)\[(-?\d+)\]$")
_CONSTRAINT = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<)\s*(\S+)\s*$")
_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
Mode = Literal["max", "min"]


def compatibility_margin(matrix: np.ndarray, new: int, old: int) -> float:
    """M[new][old] − M[old][old]: how much better version ``new`` serves ``old``'s gallery than ``old``
    itself does. ECC holds for the pair when it is > 0 (and at 0 only with ties passing)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return float(matrix[new, old] - matrix[old, old])


def min_margin(matrix: np.ndarray) -> float:
    """The smallest compatibility margin over every pair j < i; NaN for a single version (no pair)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    below = np.tri(len(matrix), k=-1, dtype=bool)
    if not below.any():
        return float("nan")
    return float((matrix - np.diag(matrix)[None, :])[below].min())


@dataclass(frozen=True)
class MetricName:
    """A parsed name; ``i``/``j`` are the indexes of the indexed forms."""

    text: str
    kind: str
    i: Optional[int] = None
    j: Optional[int] = None

    def value(self, entry: dict, matrix: str) -> float:
        """The number in one method entry of metrics.json (its ``num_versions`` versions); NaN if undefined."""
        size = entry["num_versions"]
        if self.kind == "flagged":
            return flagged_versions(entry.get("health"))
        if self.kind in SUMMARY_NAMES:
            return _number(entry["summary_by_metric"][_matrix_name(entry, matrix)][self.kind])
        if self.kind in ("accuracy", "Avg", "PD"):
            accuracy = entry.get("accuracy")
            if not accuracy or any(a is None for a in accuracy):
                return float("nan")
            if self.kind == "Avg":
                return M.session_average(accuracy)
            if self.kind == "PD":
                return M.performance_drop(accuracy)
            index = _resolve(-1 if self.i is None else self.i, size)
            return float("nan") if index is None else float(accuracy[index])
        values = np.array(entry["matrices"][_matrix_name(entry, matrix)], dtype=np.float64)
        if self.kind == "min_margin":
            return min_margin(values)
        i, j = _resolve(self.i, size), _resolve(self.j, size)
        if i is None or j is None or j > i or (self.kind == "margin" and j == i):
            return float("nan")
        return float(values[i, j]) if self.kind == "M" else compatibility_margin(values, i, j)

    def check_defined(self, num_versions: int, key: str) -> None:
        """Fail, naming ``key``, when a finished run of ``num_versions`` versions cannot define this name."""
        if self.kind in ("BC", "FC", "min_margin") and num_versions < 2:
            raise ConfigError(key, f"{self.text} needs at least 2 versions; the scenario has {num_versions}")
        indexes = [v for v in (self.i, self.j) if v is not None]
        resolved = [_resolve(v, num_versions) for v in indexes]
        if any(r is None for r in resolved):
            raise ConfigError(key, f"{self.text}: indexes must lie in {-num_versions}..{num_versions - 1} "
                                   f"(the scenario has {num_versions} versions)")
        if len(resolved) == 2 and (resolved[1] > resolved[0] or (self.kind == "margin" and resolved[1] == resolved[0])):
            rule = "j < i" if self.kind == "margin" else "j <= i"
            raise ConfigError(key, f"{self.text} is not computed: the gallery version must satisfy {rule}")


def parse_name(text: str, key: str) -> MetricName:
    """Parse a metric name (see the module docstring); a ConfigError naming ``key`` lists the forms."""
    text = str(text).strip()
    if text in PLAIN_NAMES:
        return MetricName(text, text)
    match = _INDEXED.match(text)
    if match is None:
        raise ConfigError(key, f"unknown metric {text!r}; use one of {', '.join(PLAIN_NAMES)}, "
                               "M[i][j], margin[i][j] or accuracy[i]")
    if match.group(1):
        return MetricName(text, match.group(1), int(match.group(2)), int(match.group(3)))
    return MetricName(text, "accuracy", int(match.group(5)))


@dataclass(frozen=True)
class Constraint:
    """``name op bound``; a name not defined yet (NaN) does not count as a violation."""

    name: MetricName
    op: str
    bound: float

    @property
    def text(self) -> str:
        return f"{self.name.text} {self.op} {self.bound:g}"

    def holds(self, value: float) -> bool:
        return math.isnan(value) or bool(_OPS[self.op](value, self.bound))


def parse_constraint(text: str, key: str) -> Constraint:
    match = _CONSTRAINT.match(str(text))
    if match is None:
        raise ConfigError(key, f"{text!r} is not a constraint; write '<metric> <op> <number>' with op one of "
                               "> >= < <=, e.g. 'AC >= 1' for ECC on every pair")
    try:
        bound = float(match.group(3))
    except ValueError:
        raise ConfigError(key, f"{match.group(3)!r} in {text!r} is not a number") from None
    return Constraint(parse_name(match.group(1), key), match.group(2), bound)


@dataclass(frozen=True)
class Evaluation:
    """The objective of one trial (mean over its seeds) and the constraints it violates."""

    value: float
    violations: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Objective:
    """What a sweep optimises: a name on one method's matrix, its direction and its constraints."""

    name: MetricName
    mode: Mode
    method: str  # the method's key (label)
    matrix: str  # cmc1, map, ...: the matrix every name is read from
    constraints: tuple[Constraint, ...] = ()

    def evaluate(self, entries: Sequence[dict]) -> Evaluation:
        """Mean over seeds (one metrics.json entry each) of the objective and of every constrained name."""
        value = _mean([self.name.value(e, self.matrix) for e in entries])
        violations = []
        for constraint in self.constraints:
            observed = _mean([constraint.name.value(e, self.matrix) for e in entries])
            if not constraint.holds(observed):
                violations.append(f"{constraint.text} ({observed:.4g})")
        return Evaluation(value, tuple(violations))


def table_values(entries: Sequence[dict], matrix: str) -> dict[str, float]:
    """Mean over seeds of each :data:`TABLE_NAMES` name the entries define (accuracy names need a classifier)."""
    out = {}
    for text in TABLE_NAMES:
        value = _mean([parse_name(text, text).value(e, matrix) for e in entries])
        if not (math.isnan(value) and text in ("accuracy", "Avg")):
            out[text] = value
    return out


def flagged_versions(health: Optional[dict]) -> float:
    """The number of versions whose health warning is on; NaN when no version could be checked (no
    classifier, or a single version), so a constraint on it does not count as violated."""
    warnings = [row["warning"] for row in (health or {}).get("versions", []) if row["warning"] is not None]
    return float(sum(warnings)) if warnings else float("nan")


def _matrix_name(entry: dict, matrix: str) -> str:
    if matrix not in entry["matrices"]:
        raise ConfigError("sweep.objective.matrix", f"{matrix!r} is not a matrix of this evaluation; "
                                                    f"available: {', '.join(entry['matrices'])}")
    return matrix


def _resolve(index: int, size: int) -> Optional[int]:
    resolved = index + size if index < 0 else index
    return resolved if 0 <= resolved < size else None


def _number(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


def _mean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float("nan") if values.size == 0 or np.isnan(values).any() else float(values.mean())
