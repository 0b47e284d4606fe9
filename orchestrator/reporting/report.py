"""Plots, matrix CSVs and report.md, rendered from a run directory's files only.

Reading nothing but ``RUN_DIR/metrics.json`` lets ``compat report RUN_DIR`` re-render a finished (or
copied) run without Ray, the store or any live object. Optional keys of metrics.json may be missing.
No formula lives here: ECC flags and summary metrics come from metrics.json (see metrics.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any, Optional, Union

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from orchestrator.errors import RunError
from orchestrator.evaluation import BY_BLOCK
from orchestrator.evaluation.metrics import ECC_COMPARISON, upgrade_pairs
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import Location, RunStorage

_SUMMARY_KEYS = ("AC", "AM", "BC", "FC")
_VERDICT_KEYS = ("AC", "AM", "ECC")  # per metric; ECC: whether it held on every pair
_METRIC_TITLES = {"cmc1": "CMC top-1", "cmc5": "CMC top-5", "map": "mAP"}
_ANNOTATE_MAX = 12  # versions; beyond this cell numbers are unreadable (the CSVs carry them)
_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="white")

Matrix = list[list[Optional[float]]]


def render_report(run_dir: Union[RunStorage, Location]) -> str:
    """Write plots, ``matrix_<method>_<metric>.csv`` and ``report.md`` into the run; return report.md's location."""
    run = RunStorage.of(run_dir)
    metrics = _load(run)
    slugs = _slugs(metrics["methods"])
    for key, method in metrics["methods"].items():
        for metric, matrix in (method.get("matrices") or {}).items():
            _write_csv(run, f"matrix_{slugs[key]}_{metric}.csv", matrix)
    from orchestrator.reporting.service_report import service_plots, service_section

    images = _heatmaps(run, metrics, slugs) + _accuracy_plot(run, metrics) + service_plots(run, metrics)
    run.write_text(runfiles.REPORT, _markdown(metrics, slugs, images) + "\n".join(["", *service_section(metrics, images)]))
    return run.location_of(runfiles.REPORT)


def format_summary_table(metrics: dict[str, Any]) -> str:
    """The plain-text summary the CLI prints at the end of a run: AC, AM and whether ECC held on every
    pair, on every metric side by side (the primary metric first), columns aligned under each metric."""
    names = _metric_order(metrics)
    rows = [["method", *(_VERDICT_KEYS * len(names))], *_verdict_rows(metrics, names)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    groups = [slice(1 + 3 * m, 4 + 3 * m) for m in range(len(names))]
    for name, group in zip(names, groups):  # widen a group's first column until its title fits above it
        widths[group.start] += max(0, len(_metric_title(metrics, name)) - sum(widths[group]) - 4)

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += ["  ".join(cell.rjust(w) for cell, w in zip(cells[group], widths[group])) for group in groups]
        return "    ".join(parts).rstrip()

    titles = [" " * widths[0]] + [_metric_title(metrics, name).ljust(sum(widths[group]) + 4)
                                  for name, group in zip(names, groups)]
    return "\n".join([*_verdict_caption(metrics), "    ".join(titles).rstrip(), *map(line, rows),
                      *_health_warnings(metrics)])


def _health_warnings(metrics: dict[str, Any]) -> list[str]:
    """One line per version the health check flagged (metrics.json's ``health``), under a blank line."""
    lines = [f"WARNING {key} {text}" for key, method in metrics["methods"].items()
             for text in (method.get("health") or {}).get("warnings") or []]
    return ["", *lines] if lines else []


# -- reading ---------------------------------------------------------------------------------------
def _load(run: RunStorage) -> dict[str, Any]:
    path = run.location_of(runfiles.METRICS)
    try:
        metrics = json.loads(run.read_bytes(runfiles.METRICS))
    except FileNotFoundError:
        raise RunError(f"{path} does not exist; run the experiment (or resume it) before rendering a report") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} is unreadable ({exc}); re-run the experiment with --resume to rewrite it") from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("methods"), dict):
        raise RunError(f"{path} has no 'methods' mapping; re-run the experiment with --resume to rewrite it")
    return metrics


def _primary(metrics: dict[str, Any]) -> str:
    return metrics.get("primary") or "cmc1"


def _ties(metrics: dict[str, Any]) -> str:
    return metrics.get("ties") or "fail"


def _ecc_rule(metrics: dict[str, Any]) -> str:
    """The criterion the run's ECC flags were decided with, e.g. ``new/old > old/old``."""
    return f"new/old {ECC_COMPARISON[_ties(metrics)]} old/old"


def _metric_order(metrics: dict[str, Any]) -> list[str]:
    """Every matrix name of the run, the primary metric first: ``primary`` orders, it never selects."""
    names = list(dict.fromkeys(n for m in metrics["methods"].values() for n in (m.get("matrices") or {})))
    primary = _primary(metrics)
    return sorted(names, key=lambda name: name != primary)


def _metric_title(metrics: dict[str, Any], name: str) -> str:
    """A matrix's title for people: ``cmc20`` → CMC top-20 (= Recall@20), ``map100`` → mAP@100, ``mapR`` →
    MAP@R, an approximate index's ``index_`` cells → "… (index)"."""
    indexed = name.startswith("index_")
    base = name.removeprefix("index_")
    title = _METRIC_TITLES.get(base)
    if title is None and re.fullmatch(r"cmc\d+", base):
        title = f"CMC top-{base[3:]}"
    elif title is None and re.fullmatch(r"map\d+", base):
        title = f"mAP@{base[3:]}"
    elif title is None:
        title = "MAP@R" if base == "mapR" else base
    title = f"{title} (index)" if indexed else title
    return f"{title} (primary)" if name == _primary(metrics) else title


def _slugs(methods: dict[str, Any]) -> dict[str, str]:
    """File-name-safe method keys, made unique when two labels collapse to the same slug."""
    slugs: dict[str, str] = {}
    for index, key in enumerate(methods):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "method"
        slugs[key] = slug if slug not in slugs.values() else f"{slug}-{index}"
    return slugs


def _square(matrix: Matrix) -> Matrix:
    """Rows padded with None to T columns (metrics.json may omit the upper triangle)."""
    size = len(matrix)
    return [list(row) + [None] * (size - len(row)) for row in matrix]


def _cell(matrix: Optional[list], i: int, j: int) -> Any:
    return matrix[i][j] if matrix and i < len(matrix) and j < len(matrix[i]) else None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return "–" if value is None else str(value)


def _violations(ecc: Optional[list]) -> list[tuple[int, int]]:
    """Cells (query i, gallery j) where metrics.json says ECC does not hold."""
    return [(i, j) for i, row in enumerate(ecc or []) for j, holds in enumerate(row) if holds is False]


def _ecc_every_pair(method: dict[str, Any], metric: str) -> str:
    """metrics.json's ``ECC_every_pair`` of the metric; files written before it existed derive it from
    the per-pair flags. ``n/a`` for a single version (no pair)."""
    summary = (method.get("summary_by_metric") or {}).get(metric) or {}
    if "ECC_every_pair" in summary:
        held = summary["ECC_every_pair"]
    else:
        flags = [v for row in (method.get("ecc") or {}).get(metric) or [] for v in row if v is not None]
        held = all(flags) if flags else None
    return "n/a" if held is None else _fmt(held)


def _verdict_rows(metrics: dict[str, Any], names: list[str]) -> list[list[str]]:
    rows = []
    for key, method in metrics["methods"].items():
        row = [key]
        for name in names:
            summary = (method.get("summary_by_metric") or {}).get(name) or {}
            row += [_fmt(summary.get("AC")), _fmt(summary.get("AM")), _ecc_every_pair(method, name)]
        rows.append(row)
    return rows


def _verdict_caption(metrics: dict[str, Any]) -> list[str]:
    over = " (means over seeds; ECC: held in every seed)" if metrics.get("seeds") else ""
    return [f"Verdicts on every metric{over}:",
            f"AC: share of pairs where {_ecc_rule(metrics)} (ties {_ties(metrics)}); AM: mean score in %; "
            "ECC: held on every pair."]


# -- files -----------------------------------------------------------------------------------------
def _write_csv(run: RunStorage, name: str, matrix: Matrix) -> None:
    """Header ``query\\gallery,0,1,...``; one row per query version; empty cells above the diagonal."""
    rows = _square(matrix)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["query\\gallery", *range(len(rows))])
    writer.writerows([i, *("" if v is None else repr(float(v)) for v in row)] for i, row in enumerate(rows))
    run.write_text(name, text.getvalue())


def _save(fig: Figure, run: RunStorage, name: str) -> str:
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, no figure registry to leak
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    run.write_bytes(name, image.getvalue())
    return name


def _draw_heatmap(ax, matrix: Matrix, ecc: Optional[list], vmin: float, vmax: float, title: str):
    """Lower-triangular heatmap: masked upper triangle, values annotated, ECC violations outlined in red."""
    data = np.array(_square(matrix), dtype=float)  # None -> nan -> masked
    image = ax.imshow(np.ma.masked_invalid(data), cmap=_CMAP, vmin=vmin, vmax=vmax)
    size = len(data)
    ax.set(xlabel="gallery version", ylabel="query version", xticks=range(size), yticks=range(size), title=title)
    if size <= _ANNOTATE_MAX:
        middle = (vmin + vmax) / 2
        for i, j in zip(*np.nonzero(np.isfinite(data))):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=max(6, 11 - size // 2),
                    color="white" if data[i, j] < middle else "black")
    for i, j in _violations(ecc):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    return image


def _side(size: int) -> float:
    """Inches per heatmap panel: grows with the number of versions, capped so 30+ versions stay printable."""
    return min(2.5 + 0.45 * size, 8.0)


def _heatmaps(run: RunStorage, metrics: dict[str, Any], slugs: dict[str, str]) -> list[str]:
    """One heatmap per method and all side by side, on one colour scale so methods compare by eye."""
    primary = _primary(metrics)
    panels = [(key, m["matrices"][primary], (m.get("ecc") or {}).get(primary))
              for key, m in metrics["methods"].items() if (m.get("matrices") or {}).get(primary)]
    values = [v for _, matrix, _ in panels for row in matrix for v in row if v is not None]
    if not values:
        return []
    vmin, vmax = min(values), max(values)
    vmax = vmax if vmax > vmin else vmin + 1e-6
    note = f" (red: ECC violated, ties {_ties(metrics)})"
    written = []
    for key, matrix, ecc in panels:
        side = _side(len(matrix))
        fig = Figure(figsize=(side + 1, side), layout="constrained")
        title = f"{key}: {primary}{note if _violations(ecc) else ''}"
        image = _draw_heatmap(fig.add_subplot(), matrix, ecc, vmin, vmax, title)
        fig.colorbar(image, label=primary)
        written.append(_save(fig, run, f"heatmap_{slugs[key]}.png"))
    side = _side(max(len(matrix) for _, matrix, _ in panels))
    fig = Figure(figsize=(side * len(panels) + 1, side + 0.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, matrix, ecc) in zip(axes, panels):
        image = _draw_heatmap(ax, matrix, ecc, vmin, vmax, key)
    fig.colorbar(image, ax=list(axes), label=primary)
    any_violation = any(_violations(ecc) for _, _, ecc in panels)
    fig.suptitle(f"{primary}: query version (rows) vs gallery version (columns){note if any_violation else ''}")
    written.insert(0, _save(fig, run, "heatmaps.png"))
    return written


def _accuracy_plot(run: RunStorage, metrics: dict[str, Any]) -> list[str]:
    curves = {key: m["accuracy"] for key, m in metrics["methods"].items() if m.get("accuracy")}
    if not curves:
        return []
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for key, accuracy in curves.items():
        ax.plot(range(len(accuracy)), np.array(accuracy, dtype=float), marker="o", label=key)
    ax.set(xlabel="version (session)", ylabel="accuracy on seen classes", title="Classification accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    return [_save(fig, run, "accuracy.png")]


# -- report.md -------------------------------------------------------------------------------------
def _md_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _method_section(key: str, method: dict[str, Any], slug: str, images: list[str], rule: str) -> list[str]:
    matrices = method.get("matrices") or {}
    lines = [f"## {key}", "", f"- method: `{method.get('method', key)}`",
             f"- params: `{json.dumps(method.get('params') or {}, sort_keys=True)}`"]
    lines += ["- matrices: " + ", ".join(f"[{m}](matrix_{slug}_{m}.csv)" for m in matrices), ""]
    if f"heatmap_{slug}.png" in images:
        lines += [f"![{key} heatmap](heatmap_{slug}.png)", ""]
    by_metric = method.get("summary_by_metric") or {}
    if by_metric:
        lines += _md_table(("metric", *_SUMMARY_KEYS),
                           [[m, *(_fmt(s.get(k)) for k in _SUMMARY_KEYS)] for m, s in by_metric.items()])
    size = max((len(m) for m in matrices.values()), default=0)
    rows = []
    for new, old in upgrade_pairs(size):
        for metric, matrix in matrices.items():
            ecc = (method.get("ecc") or {}).get(metric)
            rows.append([f"{new} vs {old}", metric, _fmt(_cell(matrix, old, old)), _fmt(_cell(matrix, new, old)),
                         _fmt(_cell(matrix, new, new)), _fmt(_cell(ecc, new, old))])
    if rows:
        lines += [f"Two-model comparisons (new model vs old model; ECC: {rule}):", ""]
        lines += _md_table(("new vs old", "metric", "old/old", "new/old", "new/new", "ECC"), rows)
    return lines


def seed_verdict_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Header and rows of a multi-seed run's ``seeds.verdicts``, one per method and metric (the primary
    first): AC and AM as mean ± std, ECC as the seeds where it held on every pair (k/n); [] without."""
    seeds = metrics.get("seeds") or {}
    table = seeds.get("verdicts") or {}
    if not table:
        return []
    count = len(seeds.get("values") or [])
    rows = [["method", "metric", "AC", "AM", "ECC"]]
    for key, by_metric in table.items():
        for name in sorted(by_metric, key=lambda name: name != _primary(metrics)):
            v = by_metric[name]
            held = v.get("ECC_every_pair_seeds")
            rows.append([key, _metric_title(metrics, name), f"{_fmt(v.get('AC'))} ± {_fmt(v.get('AC_std'))}",
                         f"{_fmt(v.get('AM'))} ± {_fmt(v.get('AM_std'))}", "n/a" if held is None else f"{held}/{count}"])
    return rows


def _seeds_section(metrics: dict[str, Any]) -> list[str]:
    """The verdicts over seeds (:func:`seed_verdict_rows`), then mean ± std of the other numbers, from
    ``mean``/``std`` mapping method -> summary key -> number."""
    seeds = metrics["seeds"]
    mean, std = seeds.get("mean") or {}, seeds.get("std") or {}
    title = "## Over seeds " + ", ".join(str(s) for s in seeds.get("values", [])) + " (mean ± std)"
    lines = [title, ""]
    verdict_rows = seed_verdict_rows(metrics)
    if verdict_rows:
        lines += ["Verdicts on every metric; ECC: the seeds where it held on every pair.", "",
                  *_md_table(verdict_rows[0], verdict_rows[1:]), f"On `{_primary(metrics)}`:", ""]
    per_method = {key: values for key, values in mean.items() if isinstance(values, dict)}
    if not per_method:  # an unexpected shape: show it rather than guess
        return lines + ["```json", json.dumps({"mean": mean, "std": std}, indent=1, sort_keys=True), "```", ""]
    columns = [k for k in _SUMMARY_KEYS if any(k in v for v in per_method.values())]
    columns += sorted({k for v in per_method.values() for k in v} - set(columns))
    if verdict_rows:
        columns = [c for c in columns if c not in ("AC", "AM")]
    rows = [[key, *(f"{_fmt(values.get(c))} ± {_fmt((std.get(key) or {}).get(c))}" for c in columns)]
            for key, values in per_method.items()]
    return lines + _md_table(("method", *columns), rows)


def _update_section(metrics: dict[str, Any]) -> list[str]:
    """The BCT-style table, methods side by side: first version (old) vs last version (new), every
    metric, with the update gain metrics.json carries when an ``independent`` method ran (new*)."""
    rows = []
    for key, method in metrics["methods"].items():
        matrices = method.get("matrices") or {}
        for metric, matrix in matrices.items():
            new = len(matrix) - 1
            if new < 1:
                continue
            ecc = (method.get("ecc") or {}).get(metric)
            gain = (method.get("update_gain") or {}).get(metric)
            rows.append([key, metric, _fmt(_cell(matrix, 0, 0)), _fmt(_cell(matrix, new, 0)),
                         _fmt(_cell(matrix, new, new)), _fmt(_cell(ecc, new, 0)), _fmt(gain)])
    if not rows:
        return []
    return ["## Update: first version (old) vs last version (new)", "",
            f"ECC: {_ecc_rule(metrics)}. Update gain: (new/old − old/old) / (new*/new* − old/old), "
            "new* = the `independent` method's last version (– without one).", "",
            *_md_table(("method", "metric", "old/old", "new/old", "new/new", "ECC", "update gain"), rows)]


def _block_section(metrics: dict[str, Any]) -> list[str]:
    """CMC top-1 of every cell split by the version that first trained on each class: shows whether a
    cross-test loses on the classes both models know or on those the gallery model never saw."""
    lines = []
    for key, method in metrics["methods"].items():
        blocks = method.get(BY_BLOCK)
        if not blocks:
            continue
        cells = blocks["cells"]
        size = len(cells)
        if size <= 6:  # every cell, column by column
            shown = [(i, j) for j in range(size) for i in range(j, size)]
        else:  # the consecutive pairs and (last, first), each after its gallery's self-test
            shown = sorted({(j, j) for _, j in upgrade_pairs(size)} | set(upgrade_pairs(size)), key=lambda c: (c[1], c[0]))
        rows = []
        for i, j in shown:
            values = []
            for b, value in enumerate(cells[i][j]):
                own = cells[j][j][b]
                lost = i != j and value is not None and own is not None and value <= own
                values.append(_fmt(value) + (" ↓" if lost else ""))
            rows.append([f"v{i}→v{j}" + (" (self)" if i == j else ""), *values])
        lines += [f"### `{key}`", "", *_md_table(("cell", *(f"classes of {b}" for b in blocks["blocks"])), rows)]
    if not lines:
        return []
    return ["## CMC top-1 by class block", "",
            "Classes grouped by the version that first trained on them (`none`: no version did). ↓ marks a "
            "cross-model cell at or below the gallery version's own self-test on that block.", "", *lines]


def _flips_section(metrics: dict[str, Any]) -> list[str]:
    """Negative-flip rates (metrics.json's ``negative_flip_rate``) of the consecutive pairs and (last, first):
    the queries the old model's own pair got right at top-1 that the new model gets wrong, without
    backfilling (new/old) and with the gallery re-embedded (new/new); ± std over seeds where there are several."""
    rows = []
    for key, method in metrics["methods"].items():
        flips = method.get("negative_flip_rate")
        if not flips:
            continue
        spread = ((metrics.get("methods_std") or {}).get(key) or {}).get("negative_flip_rate") or {}
        cmc1 = (method.get("matrices") or {}).get("cmc1")
        for new, old in upgrade_pairs(len(flips["new_old"])):
            rows.append([key, f"{new} vs {old}", _fmt(_cell(cmc1, old, old)),
                         *(_percent(_cell(flips[cell], new, old), _cell(spread.get(cell), new, old))
                           for cell in ("new_old", "new_new"))])
    if not rows:
        return []
    over = " Means ± std over seeds." if metrics.get("seeds") else ""
    return ["## Negative flips (%)", "",
            "The share of queries that the old version's own pair (old/old: its queries, its gallery) gets right "
            "at top-1 and the new version gets wrong: against the old gallery (NFR new/old, no backfill) and "
            f"against its own re-embedded gallery (NFR new/new). Lower is better; 0 = no regression.{over}", "",
            *_md_table(("method", "new vs old", "old/old top-1", "NFR new/old", "NFR new/new"), rows)]


def _gate_section(metrics: dict[str, Any]) -> list[str]:
    """The release gate of every upgrade (metrics.json's ``gate``, what ``compat check`` prints for the
    pair): new/old − old/old on CMC top-1 and mAP and the negative-flip rate, each with its interval, and
    the verdict; over seeds, every seed's row and how many seeds passed."""
    rows, first = [], None
    for key, method in metrics["methods"].items():
        for pair in method.get("gate") or []:
            first = first or pair
            upgrade = f"{pair['new_version']} vs {pair['old_version']}"
            if "by_seed" not in pair:
                rows.append([key, upgrade, *_gate_cells(pair)])
                continue
            rows += [[key, upgrade, f"seed {seed}", *_gate_cells(entry)] for seed, entry in pair["by_seed"].items()]
            rows.append([key, upgrade, "all", "", "", "", f"**{pair['compatible_seeds']}/{len(pair['by_seed'])} seeds "
                                                            "compatible**"])
    if first is None:
        return []
    level = f"{100 * first['confidence']:g} %"
    beyond = "above" if first["ties"] == "fail" else "at or above"
    seeds = metrics.get("seeds")
    command = "`compat check --old RUN --old-method M --old-version j --new RUN --new-method M --new-version i`"
    header = ["method", "new vs old", *(["seed"] if seeds else []), f"new/old − old/old CMC top-1 [{level}]",
              f"new/old − old/old mAP [{level}]", f"NFR new/old % [{level}]", "verdict"]
    return ["## Release gate of every upgrade", "",
            f"Each upgrade as {command} judges it{' on RUN/seed-N' if seeds else ''} (ties {first['ties']}): "
            f"the paired-bootstrap interval over the queries ({first['resamples']} resamples, seed {first['seed']}) "
            f"of new/old − old/old, compatible when its lower bound is {beyond} 0 on CMC top-1 and on mAP; the "
            "negative-flip rate (NFR) of new/old is reported, not gated. See docs/guide/release-gate.md.", "",
            *_md_table(header, rows)]


def _gate_cells(entry: dict[str, Any]) -> list[str]:
    """Both differences and the new/old flip rate with their intervals, and the verdict, of one gate."""
    def interval(value: dict[str, float], scale: float, digits: int, sign: str) -> str:
        return (f"{scale * value['estimate']:{sign}.{digits}f} [{scale * value['low']:{sign}.{digits}f}, "
                f"{scale * value['high']:{sign}.{digits}f}]")

    return [interval(entry["difference"]["cmc1"], 1, 4, "+"), interval(entry["difference"]["map"], 1, 4, "+"),
            interval(entry["negative_flip_rate"]["new_old"], 100, 2, ""),
            "compatible" if entry["compatible"] else "**not compatible**"]


def _percent(value: Optional[float], std: Optional[float] = None) -> str:
    """A fraction as a percentage, with ``± std`` when a multi-seed run gives one."""
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if std is None else f"{100 * value:.2f} ± {100 * std:.2f}"


def _session_accuracy_section(metrics: dict[str, Any]) -> list[str]:
    """FSCIL table (percent): accuracy on all seen classes per session, Avg, PD (± std over seeds when
    there are several), the last session's base/novel accuracy and the trainable parameter count."""
    entries = {key: m for key, m in metrics["methods"].items() if m.get("accuracy_summary")}
    if not entries:
        return []
    sessions = max(len(m["accuracy"]) for m in entries.values())
    rows = []
    for key, method in entries.items():
        summary, accuracy = method["accuracy_summary"], method["accuracy"]
        spread = ((metrics.get("methods_std") or {}).get(key) or {}).get("accuracy_summary") or {}
        cells = [_percent(accuracy[s]) if s < len(accuracy) else "–" for s in range(sessions)]
        params = method.get("trainable_parameters")
        rows.append([key, *cells, _percent(summary["avg"], spread.get("avg")), _percent(summary["pd"], spread.get("pd")),
                     _percent(summary["base"][-1]), _percent(summary["novel"][-1]),
                     "–" if params is None else f"{params:,}"])
    header = ("method", *(f"S{s}" for s in range(sessions)), "Avg", "PD", "last base", "last novel", "trainable")
    seeds = (metrics.get("seeds") or {}).get("values")
    over = f" Means over seeds {', '.join(map(str, seeds))}." if seeds else ""
    return ["## Accuracy per session (%)", "",
            "Top-1 over the test images of every class seen so far; Avg = mean over sessions, PD = first − last; "
            f"base/novel = the first session's classes vs later ones.{over}", "", *_md_table(header, rows)]


def _health_section(metrics: dict[str, Any]) -> list[str]:
    """Per method and version: top-1 on the classes known before its step and on the ones it added, its
    self-test on every metric, and the health check's flag; the warnings first, where there are any."""
    healths = {key: m["health"] for key, m in metrics["methods"].items() if m.get("health")}
    if not healths:
        return []
    names = _metric_order(metrics)
    ratio = next(iter(healths.values())).get("min_new_class_ratio")
    rows = []
    for key, health in healths.items():
        for row in health["versions"]:
            flag = row.get("warning")
            seeds = row.get("warning_seeds")
            rows.append([key, str(row["version"]), _fmt(_count(row.get("new_classes"))),
                         _fmt(row.get("accuracy_previous_classes")), _fmt(row.get("accuracy_new_classes")),
                         *(_fmt((row.get("self_test") or {}).get(n)) for n in names),
                         "–" if flag is None else ("**under-trained**" + (f" (seeds {', '.join(map(str, seeds))})"
                                                                          if seeds else "") if flag else "ok")])
    warnings = [f"- **Warning** `{key}` {text}" for key, health in healths.items() for text in health.get("warnings") or []]
    over = " Means over seeds; flagged when flagged in any seed." if metrics.get("seeds") else ""
    return ["## Health of every version", "",
            *(warnings + [""] if warnings else []),
            "Top-1 classification accuracy on the classes each version knew before its step (previous) and on the "
            f"classes its step added (new), and its self-test retrieval (the matrix diagonal). A version is "
            f"flagged when new < {_fmt_ratio(ratio)} × previous (`evaluation.min_new_class_ratio`): its cross-model "
            f"cells then compare a model that has not learned its new classes.{over}", "",
            *_md_table(("method", "version", "new classes", "top-1 previous", "top-1 new",
                        *(f"self-test {_METRIC_TITLES.get(n, n)}" for n in names), "check"), rows)]


def _count(value: Any) -> Optional[str]:
    """A count as metrics.json holds it (a mean over seeds of equal counts stays an int)."""
    return None if value is None else f"{value:g}"


def _fmt_ratio(value: Any) -> str:
    return "?" if value is None else f"{value:g}"


def skipped_images_line(skipped: dict[str, Any]) -> Optional[str]:
    """The CLI's line about ``data.bad_images: skip`` (metrics.json's ``skipped_images``), or None when
    nothing was skipped."""
    parts, damaged = [], 0
    for key, splits in skipped.items():
        counts = [f"{split} {facts['skipped']}" for split, facts in splits.items() if facts["skipped"]]
        damaged += sum(len(facts["damaged_files"]) for facts in splits.values())
        parts += [f"{key} {', '.join(counts)}"] if counts else []
    if not parts and not damaged:
        return None
    files = f"; {damaged} damaged file(s), whose unlocated samples are not counted" if damaged else ""
    return f"Skipped unreadable images (bad_images: skip): {'; '.join(parts) or 'none'}{files}; listed in report.md"


def _skipped_section(metrics: dict[str, Any], shown: int = 5) -> list[str]:
    """What ``data.bad_images: skip`` left out of each split: counts, damaged files, the first errors."""
    skipped = metrics.get("skipped_images")
    if not skipped:
        return []
    lines = ["## Skipped images", "",
             "`bad_images: skip` decoded every image once and left out those that failed (each error names its "
             "file). A file unreadable past some point also loses the samples after the damage, which are not "
             "counted.", ""]
    for key, splits in skipped.items():
        for split, facts in splits.items():
            lines.append(f"- `{key}` {split}: {facts['skipped']} image(s) skipped"
                         + (f", {len(facts['damaged_files'])} damaged file(s)" if facts["damaged_files"] else ""))
            lines += [f"  - {error}" for error in facts["damaged_files"] + facts["first"][:shown]]
            if facts["skipped"] > shown:
                lines.append(f"  - ... and {facts['skipped'] - shown} more")
    return lines + [""]


def _markdown(metrics: dict[str, Any], slugs: dict[str, str], images: list[str]) -> str:
    experiment = metrics.get("experiment", "experiment")
    lines = [f"# Compatibility report: {experiment}", ""]
    for label, key in (("seed", "seed"), ("protocol", "protocol"), ("config digest", "config_digest")):
        if metrics.get(key) is not None:
            lines.append(f"- {label}: `{metrics[key]}`")
    lines += [f"- primary metric (orders the tables, draws the heatmaps): `{_primary(metrics)}`",
              f"- ECC: {_ecc_rule(metrics)} (ties {_ties(metrics)}); mAP ties: `{metrics.get('map_ties') or 'lower-index'}`",
              "", *_skipped_section(metrics), "## Verdicts on every metric", ""]
    names = _metric_order(metrics)
    over = " Over seeds: the means, and ECC where it held in every seed." if metrics.get("seeds") else ""
    lines += [f"AC: share of pairs where ECC holds; AM in %; ECC: held on every pair.{over}", ""]
    lines += _md_table(["method", *(f"{_metric_title(metrics, n)} {k}" for n in names for k in _VERDICT_KEYS)],
                       _verdict_rows(metrics, names))
    lines += [f"![{name}]({name})\n" for name in ("heatmaps.png", "accuracy.png") if name in images]
    if metrics.get("seeds"):
        lines += _seeds_section(metrics)
    lines += _health_section(metrics)
    lines += _update_section(metrics)
    lines += _flips_section(metrics)
    lines += _gate_section(metrics)
    lines += _block_section(metrics)
    lines += _session_accuracy_section(metrics)
    for key, method in metrics["methods"].items():
        lines += _method_section(key, method, slugs[key], images, _ecc_rule(metrics))
    return "\n".join(lines)


def format_seed_table(metrics: dict) -> str:
    """Plain-text tables the CLI prints after a multi-seed run: the verdicts on every metric (AC and AM
    mean ± std, seeds with ECC on every pair), then mean ± std of the other table names on the primary."""
    seeds = metrics["seeds"]
    over = f"Over seeds {', '.join(map(str, seeds['values']))} (mean ± sample std)"
    verdict_rows = seed_verdict_rows(metrics)
    text = f"{over}; ECC: seeds where it held on every pair:\n{_aligned(verdict_rows, 2)}\n\n" if verdict_rows else ""
    mean, std = seeds["mean"], seeds["std"]
    names = [n for n in next(iter(mean.values())) if not (verdict_rows and n in ("AC", "AM"))]
    rows = [["method", *names]]
    rows += [[key, *(f"{_fmt_mean(mean[key].get(n))} ± {_fmt_mean(std[key].get(n))}" for n in names)] for key in mean]
    return text + f"{over}, on {metrics['primary']}:\n" + _aligned(rows)


def _aligned(rows: list[list[str]], text_columns: int = 1) -> str:
    """Rows as aligned lines: the first ``text_columns`` columns left-aligned, the numbers right-aligned."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c < text_columns else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)


def _fmt_mean(value: Optional[float]) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.3f}"
