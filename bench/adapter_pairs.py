"""How many paired embeddings each training-free adapter needs: one run, every kind at every pair count.

The experiment of configs/adapters_synthetic.yaml, its methods kept, plus one new-to-old adapter per
(kind, pairs) that loads independent's versions and fits its map (base: independent), so the sweep
costs the config's training chains plus the fits, and the same run also gives the config's own table
(adapters are fitted independently of each other: the added ones change no other method's numbers). Not a Ray Tune sweep on purpose: a trial per pair count
would retrain the same chain every time. Prints, per pair count and kind, the mAP of the last version's
queries against version 0's gallery (mean ± std over seeds), next to independent without an adapter
(the floor), version 0's self-test (the bar compatibility must clear) and independent's last self-test
(what a full re-embedding gives).

    python bench/adapter_pairs.py [--pairs 65,130,260,520,1040,1800] [--seeds 0,1,2] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from orchestrator import load_config  # noqa: E402
from orchestrator.engine.driver import run_experiment  # noqa: E402

KINDS = {"orthogonal": {}, "affine": {}, "low_rank": {"rank": 16}, "residual_mlp": {}}


def sweep_methods(pairs: list[int]) -> str:
    """The ``methods`` override: the config's methods, then one adapter per (kind, pairs)."""
    shipped = yaml.safe_load((ROOT / "configs" / "adapters_synthetic.yaml").read_text())["methods"]
    entries = [json.dumps(entry) for entry in shipped]
    for kind, extra in KINDS.items():
        for n in pairs:
            params = ", ".join(f"{k}: {v}" for k, v in {"kind": kind, "pairs": n, **extra, "base": "independent"}.items())
            entries.append(f"{{name: adapter, label: {kind.replace('_', '-')}-{n}, params: {{{params}}}}}")
    return f"methods=[{', '.join(entries)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="65,130,260,520,1040,1800")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output-dir", default=None, help="where the run goes (default: a temporary directory)")
    args = parser.parse_args()
    pairs = [int(n) for n in args.pairs.split(",")]
    output = args.output_dir or tempfile.mkdtemp(prefix="adapter-pairs-")
    cfg = load_config(str(ROOT / "configs" / "adapters_synthetic.yaml"), [
        "name=adapter_pairs", sweep_methods(pairs), f"seeds=[{args.seeds}]", f"output_dir={output}"])
    metrics = run_experiment(cfg, progress=False, echo=lambda line: print(line, flush=True))
    last = len(metrics["methods"]["independent"]["matrices"]["map"]) - 1

    def cell(key: str, i: int, j: int) -> str:
        mean = metrics["methods"][key]["matrices"]["map"][i][j]
        std = metrics["methods_std"][key]["matrices"]["map"][i][j]  # None for a single seed
        return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")

    print(f"\nmAP (%) of version {last}'s queries against version 0's gallery, mean ± std over seeds {args.seeds}")
    print(f"old/old (version 0 self-test): {cell('independent', 0, 0)}; independent without adapter: "
          f"{cell('independent', last, 0)}; full re-embedding (independent v{last} self-test): "
          f"{cell('independent', last, last)}\n")
    print("| pairs | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for n in pairs:
        print(f"| {n} | " + " | ".join(cell(f"{kind.replace('_', '-')}-{n}", last, 0) for kind in KINDS) + " |")
    print(f"\nrun: {Path(output) / cfg.name}")


if __name__ == "__main__":
    main()
