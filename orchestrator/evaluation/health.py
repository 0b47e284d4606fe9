"""Whether each version is trained enough for its compatibility numbers to mean something.

Per version: top-1 classification accuracy on the classes it knew before its step (``previous``) and on the
classes its own step added (``new``), and its self-test retrieval (the matrix diagonal, every metric). A
version whose ``new`` accuracy is below ``evaluation.min_new_class_ratio`` × its ``previous`` accuracy is
flagged (:func:`~orchestrator.evaluation.metrics.new_classes_undertrained`): a cross-model cell of such a
version compares a model that never learned its new classes. Version 0 has no earlier classes, so it is
never flagged. The split is per version, not the FSCIL one (``accuracy_base``/``accuracy_novel``: the first
step's classes vs all later ones), because what matters is whether the step learned what it added.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from orchestrator.evaluation.metrics import new_classes_undertrained


def version_health(entries: Sequence[dict], matrices: dict[str, list], min_ratio: float) -> dict[str, Any]:
    """metrics.json's ``health`` of one method from its manifest entries (one per version, in order) and
    its compatibility matrices by metric name."""
    versions = []
    for k, entry in enumerate(entries):
        previous, new = entry.get("accuracy_previous_classes"), entry.get("accuracy_new_classes")
        num_seen, num_previous = entry.get("num_seen"), entry.get("num_previous")
        versions.append({
            "version": k,
            "new_classes": None if num_seen is None or num_previous is None else num_seen - num_previous,
            "accuracy_previous_classes": previous, "accuracy_new_classes": new,
            "self_test": {name: _diagonal(matrix, k) for name, matrix in matrices.items()},
            "warning": new_classes_undertrained(new, previous, min_ratio),
        })
    return {"min_new_class_ratio": min_ratio, "versions": versions,
            "warnings": [warning_text(row, min_ratio) for row in versions if row["warning"]]}


def warning_text(row: dict, min_ratio: float, seeds: Optional[Sequence] = None) -> str:
    """One line for a flagged version, e.g. ``version 1: top-1 on its 5 new classes 0.030, below 0.5 × 0.990
    on the classes it knew before (under-trained?)``; with ``seeds``, the seeds where it was flagged and the
    mean accuracies."""
    count = f"its {row['new_classes']} new classes" if row.get("new_classes") is not None else "its new classes"
    new, previous = row["accuracy_new_classes"], row["accuracy_previous_classes"]
    if seeds is None:
        return (f"version {row['version']}: top-1 on {count} {new:.3f}, below {min_ratio:g} × {previous:.3f} "
                "on the classes it knew before (under-trained?)")
    return (f"version {row['version']}: top-1 on {count} below {min_ratio:g} × that on the classes it knew "
            f"before in seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} "
            f"(means {new:.3f} and {previous:.3f}; under-trained?)")


def combine_health(per_seed: Sequence[dict], seeds: Sequence, mean: Any) -> dict[str, Any]:
    """The ``health`` of a multi-seed run: the mean table (``mean``, the per-seed tables averaged by the
    caller) with each version flagged when it was flagged in any seed, and one warning per flagged version
    naming the seeds, with the mean accuracies."""
    min_ratio = per_seed[0]["min_new_class_ratio"]
    versions = []
    for k, row in enumerate(mean["versions"]):
        flagged = [seed for seed, health in zip(seeds, per_seed) if health["versions"][k]["warning"]]
        known = [health["versions"][k]["warning"] is not None for health in per_seed]
        versions.append({**row, "warning": bool(flagged) if any(known) else None, "warning_seeds": flagged})
    warnings = [warning_text(row, min_ratio, row["warning_seeds"]) for row in versions if row["warning"]]
    return {"min_new_class_ratio": min_ratio, "versions": versions, "warnings": warnings}


def _diagonal(matrix: list, k: int) -> Optional[float]:
    return matrix[k][k] if k < len(matrix) and k < len(matrix[k]) else None
