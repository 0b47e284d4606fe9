"""Results must not move: tiny versions of five shipped experiments, their numbers pinned exactly.

Each experiment below is a shipped config made tiny with ``--set``-style overrides (fixed seed, a few
classes, one or two epochs, in-process with ``resources.num_workers=0``). Its results are compared with
the values stored in ``tests/fixtures/pinned/<experiment>.json``:

- class-incremental runs (quickstart, replacement, OCA chain, FSCIL): per method every compatibility
  matrix of metrics.json (every metric), the per-class-block top-1 cells, the summaries (AC, AM, BC,
  FC per metric, update gain, FSCIL Avg/PD) and the per-version accuracy, accuracy_base and
  accuracy_novel;
- the cross-modal XBT run: the old->old and new->new Recall@K cells, the image-caption gap sigmas, and
  per method the Recall@K table of every seed with its mean and std.

Comparison is exact: float equality after a JSON round trip. tests/conftest.py runs torch on one
thread, and with one thread every run here is bitwise reproducible on one machine (checked by running
each experiment twice in separate directories and separate dataset caches). Another CPU, BLAS or
torch build may round differently; then regenerate on that machine rather than add tolerances.

Updating: ``COMPAT_UPDATE_PINNED=1 python -m pytest tests/test_pinned_results.py`` reruns the five
experiments and rewrites the stored values instead of comparing (those tests report as skipped).
The rule: a commit that moves results on purpose updates the pinned values in the same commit and
says in its message which numbers moved and why. A commit that does not mean to move results never
touches tests/fixtures/pinned/.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from orchestrator.config import load_raw
from orchestrator import load_config
from orchestrator.engine.crossmodal import run_crossmodal
from orchestrator.config.crossmodal import parse_crossmodal
from orchestrator.engine.driver import run_experiment

from helpers import config_under

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PINNED = Path(__file__).resolve().parent / "fixtures" / "pinned"
UPDATE = os.environ.get("COMPAT_UPDATE_PINNED") == "1"
SHOWN_DIFFERENCES = 25


def quiet(_: str) -> None:
    pass


# -- the five experiments, each a shipped config made tiny ---------------------------------------
def quickstart(tmp: Path) -> dict:
    cfg = config_under(
        tmp, "data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "model.width=8", "model.embedding_dim=16", "training.epochs=2", "training.incremental={epochs: 1}",
        "training.batch_size=16", "resources.num_workers=0")
    return simulation_values(run_experiment(cfg, progress=False, echo=quiet))


def replacement(tmp: Path) -> dict:
    tiny_data = ("{dataset: synthetic, variant: 2, num_classes: 4, train_per_class: 8, test_per_class: 4, "
                 "image_size: 16}")
    cfg = load_config(str(CONFIGS / "replacement_synthetic.yaml"), [
        "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=4",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "scenario.replay.per_class=4", "scenario.replace_at=[0, 2]",
        "scenario.replacements=[{upstream: 0}, {upstream: 1}]",
        "upstream.data.num_classes=6", "upstream.data.train_per_class=16", "upstream.data.test_per_class=4",
        "upstream.classes=[4, 6]", "upstream.training.epochs=1",
        "model.width=8", "training.epochs=1", "training.incremental={}", "training.batch_size=8",
        f"evaluation.sets.queries.data={tiny_data}", f"evaluation.sets.gallery.data={tiny_data}",
        "methods.0.params={num_classes: 16}", f"output_dir={tmp}"])
    return simulation_values(run_experiment(cfg, progress=False, echo=quiet))


def oca_chain(tmp: Path) -> dict:
    cfg = load_config(str(CONFIGS / "oca_chain_synthetic.yaml"), [
        "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=6",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
        "model.width=4", "model.embedding_dim=8", "training.epochs=2", "training.batch_size=16",
        "methods.2.params.delta_dim=4", f"output_dir={tmp}"])
    return simulation_values(run_experiment(cfg, progress=False, echo=quiet))


def fscil(tmp: Path) -> dict:
    cfg = load_config(str(CONFIGS / "fscil_synthetic.yaml"), [
        "data.num_classes=8", "data.train_per_class=12", "data.test_per_class=4",
        "scenario.initial_classes=4", "scenario.increment=2", "scenario.shots=2", "scenario.num_steps=3",
        "upstream_clip={images_per_class: 6, epochs: 1, batch_size: 16}",
        "training.epochs=2", "training.batch_size=16", "training.incremental={batch_size: 2}",
        f"output_dir={tmp}"])
    return simulation_values(run_experiment(cfg, progress=False, echo=quiet))


def xbt(tmp: Path) -> dict:
    raw = load_raw(str(CONFIGS / "xbt_synthetic.yaml"), [
        "seeds=[0, 1]",
        "models.old.upstream={captions: instance, captions_per_image: 3, shift: 0.5, images_per_class: 4, "
        "epochs: 1}",
        "models.new.upstream={captions: instance, captions_per_image: 3, shift: 0.2, images_per_class: 4, "
        "epochs: 1, seed: 1}",
        "data.synthetic={num_classes: 4, train_per_class: 8, test_per_class: 4}",
        "data.captions_per_image=3", "data.pair_count=16",
        "training.text={epochs: 2, batch_size: 16, optimizer: adam, lr: 0.001}",
        "training.pairs={epochs: 1, batch_size: 8, optimizer: adam, lr: 0.001}",
        f"output_dir={tmp}"])
    # sigma 0.05 and 0.2 take the code path of xbt and xbt-sigma0 with other numbers: left out for time
    raw["methods"] = [m for m in raw["methods"] if m.get("label") not in ("xbt-sigma0.05", "xbt-sigma0.2")]
    for method in raw["methods"][1:]:  # every XBT row, its projection MLP and adapters made narrow
        if method["params"].get("projection") != "linear":  # a linear projection has no hidden layer
            method["params"]["hidden"] = 16
        if "lora" in method["params"]:
            method["params"]["lora"]["rank"] = 2
    return crossmodal_values(run_crossmodal(parse_crossmodal(raw), echo=quiet))


EXPERIMENTS: dict[str, Callable[[Path], dict]] = {
    "quickstart": quickstart, "replacement_synthetic": replacement, "oca_chain_synthetic": oca_chain,
    "fscil_synthetic": fscil, "xbt_synthetic": xbt,
}


# -- what is pinned ------------------------------------------------------------------------------
def simulation_values(metrics: dict) -> dict:
    """The results of a class-incremental metrics.json, per method (no timings, params or digests)."""
    pinned = {}
    for key, entry in metrics["methods"].items():
        summary = entry["accuracy_summary"] or {}
        sections = {
            "matrices": entry["matrices"],
            "cmc1_by_block": (entry.get("cmc1_by_block") or {}).get("cells"),
            "summary_by_metric": entry["summary_by_metric"],
            "update_gain": entry.get("update_gain"),
            "accuracy": entry["accuracy"],
            "accuracy_base": summary.get("base"),
            "accuracy_novel": summary.get("novel"),
            "accuracy_avg": summary.get("avg"),
            "accuracy_pd": summary.get("pd"),
        }
        pinned[key] = {name: value for name, value in sections.items() if value is not None}
    return round_trip(pinned)


def crossmodal_values(metrics: dict) -> dict:
    """The Recall@K tables of a cross-modal metrics.json."""
    pinned = {"reference": {"old_old": metrics["old_old"], "new_new": metrics["new_new"],
                            "gap_sigma": metrics["gap_sigma"]}}
    for key, entry in metrics["methods"].items():
        pinned[key] = {"per_seed": entry["per_seed"], "mean": entry["mean"], "std": entry["std"]}
    return round_trip(pinned)


def round_trip(values: Any) -> Any:
    return json.loads(json.dumps(values))


def pinned_json(values: Any) -> str:
    """Indented JSON with every list of numbers on one line: a matrix reads row by row, and a diff of
    the file shows which rows moved."""
    text = json.dumps(values, indent=1)
    return re.sub(r"\[[^\[\]{}]*\]", lambda match: json.dumps(json.loads(match.group())), text) + "\n"


# -- comparison ----------------------------------------------------------------------------------
def differences(stored: Any, now: Any, path: str) -> Iterator[str]:
    """One line per leaf where ``now`` differs from ``stored`` (exactly; NaN equals NaN)."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for key in sorted(set(stored) | set(now)):
            where = f"{path}.{key}" if path else key
            if key not in now:
                yield f"{where}: stored but no longer produced"
            elif key not in stored:
                yield f"{where}: produced but not stored"
            else:
                yield from differences(stored[key], now[key], where)
    elif isinstance(stored, list) and isinstance(now, list):
        if len(stored) != len(now):
            yield f"{path}: {len(stored)} entries stored, {len(now)} now"
        else:
            for index, (a, b) in enumerate(zip(stored, now)):
                yield from differences(a, b, f"{path}[{index}]")
    elif not same_leaf(stored, now):
        yield f"{path}: stored {stored!r}, now {now!r}"


def same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_differences_name_every_moved_value():
    stored = {"bct": {"matrices": {"map": [[0.5, None], [0.25, 0.75]]}, "accuracy": [float("nan"), 1.0]}, "old": {}}
    now = {"bct": {"matrices": {"map": [[0.5, None], [0.25, 0.7500000000000001]]}, "accuracy": [float("nan"), 1]},
           "new": {}}
    assert list(differences(stored, now, "")) == [
        "bct.matrices.map[1][1]: stored 0.75, now 0.7500000000000001",
        "new: produced but not stored",
        "old: stored but no longer produced",
    ]
    assert list(differences({"a": [1.0, 2.0]}, {"a": [1.0]}, "")) == ["a: 2 entries stored, 1 now"]
    assert list(differences({"a": None}, {"a": 0.0}, "")) == ["a: stored None, now 0.0"]
    assert list(differences({"a": True}, {"a": 1}, "")) == ["a: stored True, now 1"]


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_results_do_not_move(experiment, tmp_path):
    values = EXPERIMENTS[experiment](tmp_path)
    path = PINNED / f"{experiment}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pinned_json({"experiment": experiment, "results": values}))
        pytest.skip(f"COMPAT_UPDATE_PINNED=1: rewrote {path.name}")
    if not path.is_file():
        pytest.fail(f"no pinned values for {experiment}: run COMPAT_UPDATE_PINNED=1 python -m pytest "
                    f"tests/test_pinned_results.py", pytrace=False)
    moved = list(differences(json.loads(path.read_text())["results"], values, ""))
    if moved:
        shown = "\n  ".join(moved[:SHOWN_DIFFERENCES])
        more = f"\n  ... and {len(moved) - SHOWN_DIFFERENCES} more" if len(moved) > SHOWN_DIFFERENCES else ""
        pytest.fail(
            f"{experiment}: {len(moved)} pinned value(s) moved (matrix cells as [query version][gallery version]):"
            f"\n  {shown}{more}\nIf the change moves results on purpose, regenerate with COMPAT_UPDATE_PINNED=1 "
            f"and commit tests/fixtures/pinned/{path.name} with it, saying why.",
            pytrace=False)
