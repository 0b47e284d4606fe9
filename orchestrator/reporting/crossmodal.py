"""report.md and recall.csv of a cross-modal run, rendered from its metrics.json only.

Re-rendering needs no Ray, store or model (``compat report RUN_DIR``). No formula lives here: the
compatibility ticks come from metrics.json (see :mod:`orchestrator.evaluation.crossmodal`).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Union

from orchestrator.errors import RunError
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import Location, RunStorage


def _load(run: RunStorage) -> dict[str, Any]:
    try:
        return json.loads(run.read_bytes(runfiles.METRICS))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {run.location_of(runfiles.METRICS)} ({exc}); finish the run with "
                       "`compat run --resume`") from None


def _header(metrics: dict[str, Any]) -> list[str]:
    return ["cell", *(f"{name[:3].upper()} R@{name.split('_r')[1]}" for name in metrics["metrics"])]


def _rows(metrics: dict[str, Any], *, markdown: bool) -> list[list[str]]:
    """old->old, one new->old row per method (mean ± std, tick when compatible), new->new; in %."""
    arrow = "→" if markdown else "->"
    names = metrics["metrics"]
    rows = [[f"old{arrow}old", *(f"{100 * metrics['old_old'][n]:.1f}" for n in names)]]
    seeds = len(metrics["seeds"])
    for key in metrics["method_order"]:  # config order (metrics.json sorts its keys)
        method = metrics["methods"][key]
        cells = []
        for n in names:
            spread = f" ± {100 * method['std'][n]:.1f}" if seeds > 1 else ""
            tick = ("✓" if markdown else "+") if method["compatible"][n] else ("✗" if markdown else "-")
            count = f" {method['compatible_seeds'][n]}/{seeds}" if seeds > 1 else ""
            cells.append(f"{100 * method['mean'][n]:.1f}{spread} {tick}{count}")
        rows.append([f"new{arrow}old {key}", *cells])
    rows.append([f"new{arrow}new", *(f"{100 * metrics['new_new'][n]:.1f}" for n in names)])
    return rows


def format_crossmodal_table(metrics: dict[str, Any]) -> str:
    """The plain-text table the CLI prints after a run."""
    rows = [_header(metrics), *_rows(metrics, markdown=False)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return (f"Recall@K in % ({metrics['models']['old']} gallery; + = new->old beats old->old, with the number of "
            f"seeds where it does):\n" + "\n".join(lines))


def render_crossmodal_report(run_dir: Union[RunStorage, Location]) -> str:
    """Write ``report.md`` and ``recall.csv`` into the run; return report.md's location."""
    run = RunStorage.of(run_dir)
    metrics = _load(run)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["cell", "seed", *metrics["metrics"]])
    writer.writerow(["old-old", "", *(metrics["old_old"][n] for n in metrics["metrics"])])
    for key in metrics["method_order"]:
        for seed, cell in metrics["methods"][key]["per_seed"].items():
            writer.writerow([f"new-old {key}", seed, *(cell[n] for n in metrics["metrics"])])
    writer.writerow(["new-new", "", *(metrics["new_new"][n] for n in metrics["metrics"])])
    run.write_text("recall.csv", table.getvalue())
    seeds = ", ".join(str(s) for s in metrics["seeds"])
    lines = [f"# Cross-modal compatibility report: {metrics['experiment']}", "",
             f"- old model (gallery): `{metrics['models']['old']}`; new model (queries): `{metrics['models']['new']}`",
             f"- seeds: {seeds}; config digest `{metrics['config_digest']}`; ties {metrics['ties']}",
             f"- image-text gap as a per-coordinate noise sigma (RMS of image - caption): old "
             f"{metrics['gap_sigma']['old']:.3f}, new {metrics['gap_sigma']['new']:.3f}", "",
             "## Recall@K (%)", "",
             "I2T: an image query hits when any of its captions is in the top K; T2I: a caption query hits when "
             "its image is. new→old rows are mean ± std over seeds; ✓ marks a mean above old→old (the "
             "compatibility criterion), followed by the number of seeds where it holds.", ""]
    rows = [_header(metrics), *_rows(metrics, markdown=True)]
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    lines += ["", "## Method settings", ""]
    for key in metrics["method_order"]:
        method = metrics["methods"][key]
        params = ", ".join(f"{k}={v}" for k, v in method["params"].items() if k != "method")
        lines.append(f"- **{key}** (`{method['method']}`): {params or 'no parameters'}")
    run.write_text(runfiles.REPORT, "\n".join(lines) + "\n")
    return run.location_of(runfiles.REPORT)
