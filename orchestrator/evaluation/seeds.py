"""Several seeds of one experiment: one complete run per seed, every metric as mean ± std over seeds.

::

    RUN_DIR/config.yaml     the experiment with its ``seeds`` list
    RUN_DIR/seed-N/         the run of seed N, exactly what ``compat run --set seed=N`` makes
    RUN_DIR/metrics.json    ``methods``: the mean over seeds of every number of every method entry
                            (ECC flags: held in every seed); ``methods_std``: the same tree of sample
                            standard deviations; ``seeds``: the table names of objectives.py per seed
                            on the primary metric, with their mean and std, and ``verdicts``: AC and AM
                            (mean, std) and the seeds where ECC held on every pair, on every metric;
                            each method's ``health``: the mean table, a version flagged when any seed flagged it;
                            each method's ``gate``: per upgrade every seed's verdict and how many passed
    RUN_DIR/report.md       heatmaps of the mean matrices plus the mean ± std table

A seed's run never depends on the others: its tasks are independent chains of the experiment's task
graph, trained side by side as far as the cluster holds their worker groups.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from orchestrator.config import ExperimentConfig
from orchestrator.evaluation.health import combine_health
from orchestrator.evaluation.objectives import table_values
from orchestrator.storage.run_storage import Location, RunStorage


def seed_runs(cfg: ExperimentConfig, run_dir: Union[RunStorage, Location]) -> list[tuple[ExperimentConfig, RunStorage]]:
    """(config, run storage) of every seed; an experiment without ``seeds`` is its own single run."""
    run = RunStorage.of(run_dir)
    if cfg.seeds is None:
        return [(cfg, run)]
    return [(cfg.with_seed(seed), run.child(f"seed-{seed}")) for seed in cfg.seeds]


def aggregate(cfg: ExperimentConfig, per_seed: Sequence[dict]) -> dict:
    """metrics.json of a multi-seed run from the metrics.json of each seed (in ``cfg.seeds`` order)."""
    first = per_seed[0]
    primary = first["primary"]
    table = {str(seed): {key: table_values([m["methods"][key]], primary) for key in m["methods"]}
             for seed, m in zip(cfg.seeds, per_seed)}
    service = {}
    if all("service" in m for m in per_seed):  # the service simulation: every number as mean and std over seeds
        service = {"service": _combine([m["service"] for m in per_seed], "mean"),
                   "service_std": _combine([m["service"] for m in per_seed], "std")}
    return {
        **service,
        "schema_version": first["schema_version"], "experiment": cfg.name, "seed": None,
        "config_digest": cfg.digest(), "protocol": first["protocol"], "primary": primary,
        "methods": {key: _mean_entry([m["methods"][key] for m in per_seed], cfg.seeds) for key in first["methods"]},
        "methods_std": {key: _combine([_without(m["methods"][key], "health", "gate") for m in per_seed], "std")
                        for key in first["methods"]},
        "seeds": {"values": list(cfg.seeds), "runs": {str(s): f"seed-{s}" for s in cfg.seeds}, "per_seed": table,
                  "mean": _combine(list(table.values()), "mean"), "std": _combine(list(table.values()), "std"),
                  "verdicts": {key: verdicts([m["methods"][key] for m in per_seed]) for key in first["methods"]}},
    }


def verdicts(entries: Sequence[dict]) -> dict[str, dict]:
    """Per metric, from one method's metrics.json entry of each seed: AC and AM (mean, sample std; std
    None for one seed) and in how many seeds ECC held on every pair (None without a pair to judge)."""
    out = {}
    for name in entries[0]["summary_by_metric"]:
        summaries = [e["summary_by_metric"][name] for e in entries]
        held = [s.get("ECC_every_pair") for s in summaries]
        out[name] = {**{f"{k}{suffix}": _combine([s[k] for s in summaries], how)
                        for k in ("AC", "AM") for suffix, how in (("", "mean"), ("_std", "std"))},
                     "ECC_every_pair_seeds": None if None in held else sum(held)}
    return out


def _mean_entry(entries: Sequence[dict], seeds: Sequence) -> dict:
    """One method's entry over seeds: every number's mean, with health and gate combined as below."""
    mean = _combine([_without(e, "gate") for e in entries], "mean")
    return _with_gate(_with_health(mean, entries, seeds), entries, seeds)


def _with_health(mean: dict, entries: Sequence[dict], seeds: Sequence) -> dict:
    """The mean entry with the health table of every seed combined (a version is flagged when it was
    flagged in any seed; see health.combine_health)."""
    if all(e.get("health") for e in entries):
        mean["health"] = combine_health([e["health"] for e in entries], seeds, mean["health"])
    return mean


def _with_gate(mean: dict, entries: Sequence[dict], seeds: Sequence) -> dict:
    """The mean entry with the release gate of every seed side by side (a verdict is not averaged: each
    seed's interval comes from its own queries), and per upgrade the number of seeds where it passed."""
    if all("gate" in e for e in entries):
        mean["gate"] = gate_over_seeds([e["gate"] for e in entries], seeds)
    return mean


def gate_over_seeds(per_seed: Sequence[list[dict]], seeds: Sequence) -> list[dict]:
    """Per upgrade (new_version, old_version): each seed's verdict with its intervals under ``by_seed``
    (keyed by the seed, as ``seeds.per_seed``) and ``compatible_seeds``, the seeds where the gate passed."""
    out = []
    for pairs in zip(*per_seed):
        first = pairs[0]
        by_seed = {str(seed): {k: entry[k] for k in ("queries", "difference", "negative_flip_rate", "ecc", "compatible")}
                   for seed, entry in zip(seeds, pairs)}
        out.append({**{k: first[k] for k in ("new_version", "old_version", "confidence", "resamples", "seed", "ties")},
                    "by_seed": by_seed, "compatible_seeds": sum(entry["compatible"] for entry in pairs)})
    return out


def _without(entry: dict, *keys: str) -> dict:
    return {k: v for k, v in entry.items() if k not in keys}


def _combine(values: list, how: str) -> Any:
    """Mean (``how="mean"``) or sample std (``"std"``; None for one seed) of every number in equally shaped
    trees; flags are True only when true in every tree; equal leaves (names, counts) are kept as they are."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _combine([v[k] for v in values], how) for k in first}
    if isinstance(first, list):
        return [_combine(list(items), how) for items in zip(*values)]
    if isinstance(first, bool):
        return all(values) if how == "mean" else None
    if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in values):
        array = np.asarray(values, dtype=np.float64)
        if how == "mean":
            return first if all(v == first for v in values) else float(array.mean())
        return float(array.std(ddof=1)) if len(values) > 1 else None
    return first
