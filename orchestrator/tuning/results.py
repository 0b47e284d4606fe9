"""Sweep outputs: the ranked results table (CSV and Markdown), the best trial as a runnable config, plots.

Ranking: complete trials that satisfy every constraint come first, best objective first; then trials
the scheduler stopped early (more steps first: their objective covers fewer versions, so it is not
comparable with a complete run's); then trials violating a constraint, marked; then failed trials.
Only a complete trial satisfying every constraint can be the best one.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from orchestrator.storage.run_storage import RunStorage
from orchestrator.evaluation.objectives import TABLE_NAMES, Mode
from orchestrator.reporting.report import _md_table, _save

if TYPE_CHECKING:
    from orchestrator.tuning.sweep import Sweep


@dataclass
class TrialOutcome:
    """What one trial reached: its parameters, last reported step and numbers, and its history."""

    trial_id: str
    params: dict[str, Any]
    steps_done: int
    steps_total: int
    objective: float
    violations: str  # "" when every constraint holds
    metrics: dict[str, float]
    history: list[tuple[int, float]]  # (steps done, objective) after each step
    error: Optional[str] = None

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        return "complete" if self.steps_done >= self.steps_total else "stopped early"

    @property
    def feasible(self) -> bool:
        return not self.violations


BEST_CONFIG = "best_config.yaml"


@dataclass
class SweepResults:
    trials: list[TrialOutcome]  # ranked, best first
    best: Optional[TrialOutcome]
    storage: RunStorage  # the sweep's

    def markdown(self) -> str:
        return self.storage.read_text("results.md")

    def best_config(self) -> str:
        """Where the best trial's config is (a path ``compat run`` takes; on object storage, copy it first)."""
        return self.storage.location_of(BEST_CONFIG)


def collect_results(sweep: "Sweep", grid) -> SweepResults:
    """Rank the trials of a finished Tune run and write every output into the sweep directory."""
    trials = rank_trials([_outcome(result, sweep) for result in grid], sweep.objective.mode)
    best = best_of(trials)
    out = sweep.storage
    write_tables(sweep, trials, out)
    if best is not None:
        write_best_config(sweep, best, out, BEST_CONFIG)
    else:
        out.delete(BEST_CONFIG)
    plot_objective_vs_params(sweep, trials, best, out, "objective_vs_params.png")
    plot_objective_per_step(sweep, trials, best, out, "objective_per_step.png")
    return SweepResults(trials, best, sweep.storage)


def rank_trials(trials: list[TrialOutcome], mode: Mode) -> list[TrialOutcome]:
    """Best first, in the tiers of the module docstring; an undefined (NaN) objective sorts last in its tier."""
    def key(t: TrialOutcome):
        tier = 3 if t.error else 2 if not t.feasible else 0 if t.status == "complete" else 1
        value = t.objective if mode == "max" else -t.objective
        return tier, -t.steps_done, -(value if not math.isnan(value) else -math.inf)

    return sorted(trials, key=key)


def best_of(ranked: list[TrialOutcome]) -> Optional[TrialOutcome]:
    """The first ranked trial when it is complete and satisfies every constraint."""
    return ranked[0] if ranked and ranked[0].status == "complete" and ranked[0].feasible else None


def write_tables(sweep: "Sweep", trials: list[TrialOutcome], out: RunStorage) -> None:
    """results.csv (full precision) and results.md: one row per trial, best first."""
    keys = [d.key for d in sweep.dimensions]
    objective = f"objective ({sweep.objective.mode} {sweep.objective.name.text})"
    header = ["rank", "trial", "status", "steps", *keys, objective, "constraints", *TABLE_NAMES, "error"]
    rows = [[rank, t.trial_id, t.status, f"{t.steps_done}/{t.steps_total}", *(t.params.get(k) for k in keys),
             t.objective, "ok" if t.feasible else f"violated: {t.violations}",
             *(t.metrics.get(n) for n in TABLE_NAMES), t.error or ""] for rank, t in enumerate(trials, 1)]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    out.write_text("results.csv", table.getvalue())
    title = (f"# Sweep {sweep.name}: {sweep.objective.mode} {sweep.objective.name.text} of "
             f"{sweep.objective.method} on {sweep.objective.matrix}")
    constraints = ", ".join(c.text for c in sweep.objective.constraints) or "none"
    lines = [title, "", f"- constraints: {constraints}", f"- trials: {len(trials)}", ""]
    lines += _md_table(header[:-1], [[_cell(v) for v in row[:-1]] for row in rows])
    out.write_text("results.md", "\n".join(lines))


def write_best_config(sweep: "Sweep", best: TrialOutcome, out: RunStorage, name: str) -> None:
    """The best trial's experiment (every swept key set) as a config ``compat run`` takes as it is."""
    raw = sweep.trial_raw(best.params, with_tracking=True)
    raw["name"] = f"{sweep.experiment.name}-best"
    subject = "".join(f", subject to {c.text}" for c in sweep.objective.constraints)
    again = (f"compat run {out.location_of(name)}" if out.is_local
             else f"copy {out.location_of(name)} to a local file, then compat run FILE")
    header = (f"# Best trial {best.trial_id} of sweep {sweep.name}: {sweep.objective.name.text} of "
              f"{sweep.objective.method} = {best.objective:.6g} ({sweep.objective.mode}{subject}).\n"
              f"# Run it again: {again}\n")
    out.write_text(name, header + yaml.safe_dump(raw, sort_keys=False))


# -- plots -----------------------------------------------------------------------------------------
_STYLE = {"complete": dict(marker="o", color="tab:blue"), "stopped early": dict(marker="o", color="tab:gray", fillstyle="none"),
          "violates a constraint": dict(marker="x", color="tab:red"),
          "best": dict(marker="*", color="tab:orange", markersize=14)}


def _style_of(trial: TrialOutcome, best: Optional[TrialOutcome]) -> str:
    if best is not None and trial is best:
        return "best"
    return "violates a constraint" if not trial.feasible else trial.status


def plot_objective_vs_params(sweep: "Sweep", trials: list[TrialOutcome], best: Optional[TrialOutcome],
                             out: RunStorage, file_name: str) -> None:
    """One panel per swept key: each trial's last objective against its value (categories for non-numbers)."""
    shown = [t for t in trials if not t.error and not math.isnan(t.objective)]
    fig = Figure(figsize=(4.2 * len(sweep.dimensions), 3.6), layout="constrained")
    axes = fig.subplots(1, len(sweep.dimensions), squeeze=False)[0]
    for ax, dim in zip(axes, sweep.dimensions):
        values = [t.params.get(dim.key) for t in shown]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = [] if numeric else sorted({str(v) for v in values})
        for trial, value in zip(shown, values):
            x = value if numeric else labels.index(str(value))
            ax.plot([x], [trial.objective], linestyle="none", **_STYLE[_style_of(trial, best)])
        if labels:
            ax.set_xticks(range(len(labels)), labels)
        if dim.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range overlap
        ax.set(xlabel=dim.key, ylabel=sweep.objective.name.text)
    for name, style in _STYLE.items():
        axes[0].plot([], [], linestyle="none", label=name, **style)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{sweep.objective.name.text} of {sweep.objective.method} per trial (last reported step)")
    _save(fig, out, file_name)


def plot_objective_per_step(sweep: "Sweep", trials: list[TrialOutcome], best: Optional[TrialOutcome],
                            out: RunStorage, file_name: str) -> None:
    """The objective after each step, one line (own colour) per trial; the marker tells its outcome, dashed
    lines violate a constraint, the best trial's line is thick; trials stopped early end early."""
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for trial in trials:
        if not trial.history:
            continue
        steps, values = zip(*trial.history)
        style = _style_of(trial, best)
        ax.plot(steps, values, linestyle="--" if style == "violates a constraint" else "-",
                linewidth=2.5 if style == "best" else 1, marker=_STYLE[style]["marker"],
                fillstyle=_STYLE[style].get("fillstyle", "full"), label=f"{trial.trial_id} ({style})")
    ax.set_xticks(range(1, sweep.num_versions + 1))
    ax.set(xlabel="steps done", ylabel=sweep.objective.name.text,
           title=f"{sweep.objective.name.text} of {sweep.objective.method} after each step")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    _save(fig, out, file_name)


# -- reading Tune results --------------------------------------------------------------------------
def _outcome(result, sweep: "Sweep") -> TrialOutcome:
    metrics = result.metrics or {}
    history: list[tuple[int, float]] = []
    frame = result.metrics_dataframe
    if frame is not None and "steps_done" in frame:
        frame = frame.drop_duplicates("steps_done", keep="last").sort_values("steps_done")
        history = [(int(s), float(v)) for s, v in zip(frame["steps_done"], frame["objective"])]
    error = None if result.error is None else (str(result.error).strip().splitlines() or [type(result.error).__name__])[-1]
    return TrialOutcome(
        trial_id=Path(result.path).name, params=dict(result.config or {}),
        steps_done=int(metrics.get("steps_done", 0)), steps_total=int(metrics.get("steps_total", sweep.num_versions)),
        objective=float(metrics.get("objective", math.nan)), violations=metrics.get("violations", ""),
        metrics=dict(metrics.get("metrics") or {}), history=history, error=error,
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return "–" if value is None else str(value)
