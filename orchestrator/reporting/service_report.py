"""The service section of report.md: mixed-gallery curves per method and backfill curves per policy,
from metrics.json's ``service`` entry (orchestrator/evaluation/mixed_gallery.py) only."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from orchestrator.reporting.report import _fmt as _fmt_value, _md_table as _table, _save
from orchestrator.storage.run_storage import RunStorage

_TITLES = {"cmc1": "CMC top-1", "cmc5": "CMC top-5", "map": "mAP", "nfr": "negative-flip rate"}
MIXED_PLOT = "service_mixed_gallery.png"
BACKFILL_PLOT = "service_backfill.png"


def _fmt(value: Any, std: Any = None) -> str:
    """A number, with ``± std`` where a multi-seed run gives one."""
    text = _fmt_value(value)
    return text if std is None or text == "–" else f"{text} ± {_fmt_value(std)}"


def _values(rows: list[dict], name: str) -> np.ndarray:
    return np.array([np.nan if row.get(name) is None else row[name] for row in rows], dtype=float)


def service_plots(run: RunStorage, metrics: dict) -> list[str]:
    """Two figures: the primary metric per step on the mixed gallery (no backfill vs full backfill, one
    colour per method); quality against cumulative backfill, one panel per method, one line per policy."""
    service = metrics.get("service")
    if not service or not service.get("methods"):
        return []
    primary, methods = service["primary"], service["methods"]
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for index, (key, entry) in enumerate(methods.items()):
        colour = f"C{index}"
        for name, style in (("full_backfill", "-"), ("no_backfill", "--")):
            rows = entry["references"][name]
            ax.plot(range(len(rows)), _values(rows, primary), style, color=colour, marker="o",
                    label=f"{key}, {name.replace('_', ' ')}")
    ax.set(xlabel="step (query version)", ylabel=_TITLES.get(primary, primary),
           title=f"Mixed gallery: {_TITLES.get(primary, primary)} per step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    images = [_save(fig, run, MIXED_PLOT)]
    fig = Figure(figsize=(4.2 * len(methods) + 0.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    for ax, (key, entry) in zip(axes, methods.items()):
        for policy, curve in entry["policies"].items():
            points = curve["points"]
            ax.plot([p["backfill_fraction"] for p in points], _values([p["mean"] for p in points], primary),
                    marker=".", label=policy)
        ax.set(title=key, xlabel="cumulative backfill (share of full backfill)")
    axes[0].set_ylabel(f"{_TITLES.get(primary, primary)}, mean over upgrades")
    axes[-1].legend(fontsize=8)
    images.append(_save(fig, run, BACKFILL_PLOT))
    return images


def service_section(metrics: dict, images: list[str]) -> list[str]:
    """Markdown: per method the references per step, then per policy the area under each curve and its
    points on the primary metric (± std over seeds where metrics.json has ``service_std``)."""
    service = metrics.get("service")
    if not service or not service.get("methods"):
        return []
    std_tree = metrics.get("service_std") or {}
    primary = service["primary"]
    lines = ["## Service: mixed gallery and partial backfill", "",
             f"Items arrive with the step that first trains their class (arrival rate {service['arrival_rate']:g} per "
             "step) and keep the embedding of the version live at their arrival unless a backfill re-embeds them; "
             "queries at step t come from version t. Every number comes from the stored vectors (no model runs "
             "again). NFR: queries right at top-1 at step t-1 and wrong at step t, among those asked at both.", ""]
    lines += [f"![mixed gallery]({MIXED_PLOT})", ""] if MIXED_PLOT in images else []
    for key, entry in service["methods"].items():
        std = (std_tree.get("methods") or {}).get(key) or {}
        rows = []
        for name in ("full_backfill", "no_backfill"):
            ref_std = (std.get("references") or {}).get(name) or []
            for step, row in enumerate(entry["references"][name]):
                spread = ref_std[step] if step < len(ref_std) else {}
                rows.append([name.replace("_", " "), str(step), str(row.get("gallery")),
                             *(_fmt(row.get(m), spread.get(m)) for m in ("cmc1", "cmc5", "map", "nfr"))])
        lines += [f"### `{key}`: mixed gallery per step", "",
                  *_table(("reference", "step", "gallery items", "CMC top-1", "CMC top-5", "mAP", "NFR"), rows)]
    lines += [f"![backfill curves]({BACKFILL_PLOT})", ""] if BACKFILL_PLOT in images else []
    for key, entry in service["methods"].items():
        std = (std_tree.get("methods") or {}).get(key) or {}
        area_rows, point_rows = [], []
        for policy, curve in entry["policies"].items():
            curve_std = (std.get("policies") or {}).get(policy) or {}
            area_std = curve_std.get("area") or {}
            area_rows.append([policy, *(_fmt(curve["area"].get(m), area_std.get(m)) for m in ("cmc1", "cmc5", "map", "nfr"))])
            for index, point in enumerate(curve["points"]):
                spread = ((curve_std.get("points") or [{}] * (index + 1))[index] or {}).get("mean") or {}
                point_rows.append([policy, f"{point['budget']:g}", f"{point['backfill_fraction']:.3f}",
                                   f"{point['forward_passes']:g}", f"{point['passes_saved']:g}",
                                   _fmt(point["mean"].get(primary), spread.get(primary)),
                                   _fmt(point["mean"].get("nfr"), spread.get("nfr"))])
        lines += [f"### `{key}`: backfill policies", "",
                  "Area under each metric (mean over upgrades) against the cumulative backfill fraction, 0 to 1:", "",
                  *_table(("policy", "CMC top-1", "CMC top-5", "mAP", "NFR"), area_rows),
                  f"Every budget (% of the gallery per upgrade); {_TITLES.get(primary, primary)} and NFR as means over "
                  "upgrades; forward passes: items re-embedded over all upgrades:", "",
                  *_table(("policy", "budget %", "backfill fraction", "forward passes", "saved",
                           _TITLES.get(primary, primary), "NFR"), point_rows)]
    return lines

