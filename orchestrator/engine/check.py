"""``compat check``, the command: where each side's embeddings come from and how the verdict is printed.

A side is an embedding file (what ``compat compare`` reads: Parquet or .npz), a finished version in a run
directory's store, or a checkpoint: a version's weights, embedded here (in-process, on the CPU) on the
evaluation sets of the experiment config that describes its model, by the code that fills a run's store.
The gate itself (cells, bootstrap intervals, verdict) is :mod:`orchestrator.evaluation.gate`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from orchestrator.config import ExperimentConfig, MethodSpec, apply_override
from orchestrator.config.crossmodal import CrossModalExperiment, parse_any
from orchestrator.config.experiment import load_raw
from orchestrator.engine.gallery_upgrade import stored_vector_upgrade
from orchestrator.errors import CheckpointError, CompatError, RunError
from orchestrator.evaluation import metrics
from orchestrator.evaluation.gate import (COMPATIBLE, CONFIDENCE, GATED, INCOMPATIBLE, MIN_CLASS_QUERIES,
                                          RESAMPLES, SEED, Side, check_sides, gate, stored_side,
                                          upgraded_old_gallery)
from orchestrator.evaluation.standalone import add_scoring_options, read_embedding_file
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage

_TITLES = {"cmc1": "CMC top-1", "map": "mAP"}
EMBEDDING_SUFFIXES = (".npz", ".parquet", ".pq")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


def load_side(flag: str, location: str, method: Optional[str], version: Optional[int],
              config: Optional[str] = None, overrides: Sequence[str] = ()) -> Side:
    """``--old``/``--new``: an embedding file; a run directory with ``--<flag>-method`` and ``-version``; or
    a checkpoint (a weights file or a version directory) with ``--<flag>-config`` and ``-method``."""
    path = Path(location)
    name = flag[2:]
    if config is not None:
        if path.suffix in EMBEDDING_SUFFIXES:
            raise CompatError(f"{flag} {location} is an embedding file; --{name}-config describes the model of a "
                              "checkpoint, drop it")
        return _checkpoint_side(flag, location, config, method, version, overrides)
    if path.suffix in CHECKPOINT_SUFFIXES:
        raise CompatError(f"{flag} {location} is a checkpoint: --{name}-config is needed (the experiment config "
                          f"YAML that describes its model, or the run directory it came from), with --{name}-method")
    is_file = "://" not in location and path.is_file()
    if is_file or path.suffix in EMBEDDING_SUFFIXES:
        if method is not None or version is not None:
            raise CompatError(f"{flag} {location} is an embedding file; --{flag[2:]}-method and --{flag[2:]}-version "
                              "select a version in a run directory, drop them")
        embeddings, labels, split = read_embedding_file(path)  # a missing file is a StoreError naming it
        return Side(location, None, (embeddings, labels), (embeddings, labels), split=split)
    document = _run_config(flag, location, "is neither an embedding file (.parquet, .npz) nor a run directory "
                                           "(no config.yaml); pass one of those")
    return _run_side(flag, location, document, method, version)


def _run_config(flag: str, location: str, missing: str) -> dict:
    """The config document of the run at ``location``; a RunError naming ``flag`` when it cannot be read
    or there is none (``missing`` says what to pass instead)."""
    try:
        document = runfiles.read_config(RunStorage.at(location))
    except OSError as exc:
        raise RunError(f"{flag} {location}: cannot read it ({str(exc).strip()})") from None
    if document is None:
        raise RunError(f"{flag} {location} {missing}")
    return document


def _run_side(flag: str, location: str, document: dict, method: Optional[str], version: Optional[int]) -> Side:
    """The stored embeddings of a finished version, under the run's protocol (a run evaluated against class
    templates is ranked against every gallery vector here)."""
    name = flag[2:]
    cfg = _image_experiment(flag, location, document)
    _method_spec(name, location, cfg, method)
    run = RunStorage.at(location)
    done = _done_versions(run, method)
    if version is None or version not in done:
        given = "is needed" if version is None else f"{version} is not a finished version of {method}"
        raise RunError(f"--{name}-version {given}: {location} has finished versions "
                       f"{', '.join(map(str, done)) or 'none'} of {method}")
    return stored_side(run, cfg.evaluation, method, version, f"{location} ({method} v{version})")


def _image_experiment(flag: str, location: str, document: dict) -> ExperimentConfig:
    """The experiment a run or a config describes, if it is one whose versions embed image galleries."""
    cfg = parse_any(document)
    if isinstance(cfg, CrossModalExperiment):
        raise RunError(f"{flag} {location} is a cross-modal experiment; compat check compares image retrieval "
                       "galleries (class-incremental, few-shot or replacement runs)")
    if cfg.seeds is not None:
        raise RunError(f"{flag} {location} holds a run per seed; pass one of them, e.g. {location}/seed-{cfg.seeds[0]}"
                       " (a config YAML: set seeds to null and seed to the run's seed)")
    return cfg


def _method_spec(name: str, location: str, cfg: ExperimentConfig, method: Optional[str]) -> MethodSpec:
    """The method ``--<name>-method`` names (its label in the experiment)."""
    specs = {m.key: m for m in cfg.methods}
    if method is None or method not in specs:
        given = "is needed" if method is None else f"'{method}' is not a method of that run"
        raise RunError(f"--{name}-method {given}: {location} has {', '.join(specs)}")
    return specs[method]


def _checkpoint_side(flag: str, location: str, config: str, method: Optional[str], version: Optional[int],
                     overrides: Sequence[str]) -> Side:
    """A version's weights, built into its method's network for the config's step ``version`` and loaded
    safely (strictly: every tensor must fit), then the config's query and gallery sets embedded on the CPU
    by the very code that fills a run's store (:meth:`orchestrator.engine.worker.Session.embed_evaluation_set`)."""
    from orchestrator.engine.driver import default_run_dir
    from orchestrator.engine.worker import Session, Worker

    name = flag[2:]
    config_flag = f"--{name}-config"
    is_run = "://" in config or Path(config).is_dir()
    if is_run:
        document = _run_config(config_flag, config, "is a directory but no run directory (no config.yaml); pass a "
                                                    "config YAML or the run directory the checkpoint came from")
        for assignment in overrides:
            apply_override(document, assignment)
    else:
        if not Path(config).is_file():
            raise CompatError(f"{config_flag} {config} does not exist; pass a config YAML or the run directory "
                              "the checkpoint came from")
        document = load_raw(config, overrides)
    cfg = _image_experiment(config_flag, config, document)
    spec = _method_spec(name, config, cfg, method)
    run = RunStorage.at(config) if is_run else default_run_dir(cfg)
    session = Session(cfg, spec, run, Worker(rank=0, world_size=1, device=torch.device("cpu")), run)
    steps = len(session.steps)
    if version is None and steps == 1:
        version = 0
    if version is None or not 0 <= version < steps:
        given = "is needed" if version is None else f"{version} is not a version of that experiment"
        raise CompatError(f"--{name}-version {given}: the step whose network {location} is loaded into, "
                          f"0 to {steps - 1} for {config}")
    step = session.steps[version]
    try:
        model = session.method.load_version(session.context(step), location)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag}: {exc} (built from {config_flag} {config}, {method} v{version})") from None
    ev = cfg.evaluation
    gallery_set = ev.query if ev.protocol == "leave-one-out" else ev.gallery
    embedded = {}
    for part in {ev.query, gallery_set}:
        data, rows, feats = session.embed_evaluation_set(part, step, model)
        embedded[part] = (feats, data.labels[rows].astype(np.int32)), data.sample_ids[rows]
    (query, query_ids), (gallery, gallery_ids) = embedded[ev.query], embedded[gallery_set]
    return Side(f"{location} ({method} v{version} of {config})", ev.protocol, query, gallery, query_ids, gallery_ids)


def _done_versions(run: RunStorage, method: str) -> list[int]:
    """The versions of ``method`` whose steps are finished, counted up from 0."""
    done = []
    while runfiles.step_done(run, method, len(done)):
        done.append(len(done))
    return done


def resolve_protocol(flag: Optional[str], old: Side, new: Side) -> str:
    """The protocol: the runs' own (they must agree with each other and with ``--protocol``), else the flag,
    else leave-one-out."""
    runs = {side.protocol for side in (old, new) if side.protocol is not None}
    if len(runs) > 1:
        raise RunError(f"{old.source} evaluates with {old.protocol} and {new.source} with {new.protocol}; "
                       "both sides need the same protocol")
    if runs and flag is not None and flag not in runs:
        raise CompatError(f"--protocol {flag} contradicts the run's own protocol {next(iter(runs))}; drop --protocol")
    return next(iter(runs), None) or flag or "leave-one-out"


def add_check_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """``compat check``."""
    parser = subparsers.add_parser(
        "check", help="release gate: is a candidate model compatible with the gallery's model? (exit 0 = yes)",
        description="Score old/old, new/old and new/new retrieval per query, bootstrap the queries for "
                    "confidence intervals of new/old - old/old on CMC top-1 and mAP and of the negative-flip "
                    "rates, and list the classes whose top-1 drops. Exit 0 when the lower bound of the "
                    "interval is above 0 on both metrics, 1 when not, 2 on bad input. Each side is an "
                    "embedding file (Parquet or .npz, as compat compare reads), a run directory with "
                    "--old-method/--old-version (--new-method/--new-version), or a checkpoint (model.pt, "
                    ".safetensors or a version directory) with --old-config and --old-method (--new-config, "
                    "--new-method): embedded here, on the CPU, on the config's evaluation sets.")
    parser.add_argument("--old", required=True,
                        help="the gallery's model: an embedding file, a run directory or a checkpoint")
    parser.add_argument("--new", required=True,
                        help="the candidate model: an embedding file, a run directory or a checkpoint")
    for side in ("old", "new"):
        parser.add_argument(f"--{side}-method", help=f"with a run directory or a checkpoint as --{side}: the method "
                                                     "(its label in the experiment)")
        parser.add_argument(f"--{side}-version", type=int,
                            help=f"with a run directory as --{side}: the version; with a checkpoint: the step whose "
                                 "network it is loaded into (optional when the experiment has one step)")
        parser.add_argument(f"--{side}-config", help=f"with a checkpoint as --{side}: the experiment config that "
                                                     "describes its model (a config YAML or the run directory it "
                                                     "came from); its evaluation sets are embedded")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every checkpoint's config (repeatable), e.g. evaluation data: "
                             "--set data.root=/data/eval")
    parser.add_argument("--confidence", type=float, default=CONFIDENCE,
                        help=f"two-sided confidence of every interval, in (0, 1) (default {CONFIDENCE})")
    parser.add_argument("--resamples", type=int, default=RESAMPLES,
                        help=f"bootstrap resamples of the queries (default {RESAMPLES})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the resampling (default {SEED})")
    add_scoring_options(parser, protocol_default=None,
                        protocol_note=" (default leave-one-out, for embedding files; a run directory brings its own)",
                        ties_help="fail (default): the lower bound must be above 0; pass: at or above 0")
    parser.add_argument("--min-class-queries", type=int, default=MIN_CLASS_QUERIES,
                        help=f"classes with fewer queries are not listed as breaks (default {MIN_CLASS_QUERIES})")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run_check)
    return parser


def run_check(args: argparse.Namespace) -> int:
    """``compat check``: every flag and both inputs checked before anything is scored."""
    if not 0 < args.confidence < 1:
        raise CompatError(f"--confidence must lie strictly between 0 and 1 (e.g. 0.95), got {args.confidence}")
    if args.resamples < 1:
        raise CompatError(f"--resamples must be at least 1, got {args.resamples}")
    if args.min_class_queries < 1:
        raise CompatError(f"--min-class-queries must be at least 1, got {args.min_class_queries}")
    if args.overrides and args.old_config is None and args.new_config is None:
        raise CompatError("--set overrides the config of a checkpoint (--old-config, --new-config); neither side "
                          "is a checkpoint, drop it")
    old = load_side("--old", args.old, args.old_method, args.old_version, args.old_config, args.overrides)
    new = load_side("--new", args.new, args.new_method, args.new_version, args.new_config, args.overrides)
    protocol = resolve_protocol(args.protocol, old, new)
    old, new = old.under(protocol), new.under(protocol)
    check_sides(old, new, protocol)
    upgraded = upgraded_old_gallery(old, new, stored_vector_upgrade)
    result = gate(old, new, protocol, confidence=args.confidence, resamples=args.resamples, seed=args.seed,
                  ties=args.ties, min_class_queries=args.min_class_queries, upgraded_gallery=upgraded)
    print(json.dumps(result) if args.json else format_check(result))
    return COMPATIBLE if result["compatible"] else INCOMPATIBLE


def format_check(result: dict) -> str:
    """The human summary of :func:`gate`'s result."""
    level = f"{100 * result['confidence']:g} %"
    rule = metrics.ECC_COMPARISON[result["ties"]]
    lines = [f"old (gallery model): {result['old']}", f"new (candidate):     {result['new']}",
             *(["new/old searches the old gallery upgraded by the candidate's maps (old-to-new), as stored "
                "vectors are upgraded in the service"] if result["old_gallery_upgraded"] else []),
             f"{result['protocol']}, {result['queries']} queries, {result['resamples']} bootstrap resamples "
             f"(seed {result['seed']}), {level} intervals", "",
             f"{'':11}{'old/old':>9}{'new/old':>9}{'new/new':>9}   new/old − old/old [{level}]    ECC (low {rule} 0)"]
    for name in GATED:
        d = result["difference"][name]
        lines.append(f"{_TITLES[name]:11}" + "".join(f"{result[c][name]:>9.4f}" for c in ("old_old", "new_old", "new_new"))
                     + f"   {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
                     + f"   {'holds' if result['ecc'][name] else 'FAILS'}")
    for cell, what in (("new_old", "new/old (no backfill)"), ("new_new", "new/new (backfilled)")):
        f = result["negative_flip_rate"][cell]
        lines.append(f"Negative flips, {what}: {100 * f['estimate']:.2f} % [{100 * f['low']:.2f}, {100 * f['high']:.2f}] "
                     "of the queries old/old gets right at top-1")
    breaks = result["class_breaks"]
    lines.append(f"Classes whose top-1 drops under new/old (>= {result['min_class_queries']} queries): "
                 + ("none" if not breaks else f"{len(breaks)}"))
    lines += [f"  class {b['label']}: {b['old_old']:.3f} -> {b['new_old']:.3f} ({b['queries']} queries, "
              f"{b['negative_flips']} negative flips)" for b in breaks[:10]]
    if len(breaks) > 10:
        lines.append(f"  ... and {len(breaks) - 10} more (--json lists them all)")
    verdict = "COMPATIBLE" if result["compatible"] else "NOT COMPATIBLE"
    failed = [_TITLES[n] for n in GATED if not result["ecc"][n]]
    why = (f"the lower bound is {'above' if result['ties'] == 'fail' else 'at or above'} 0 on CMC top-1 and mAP"
           if not failed else f"the lower bound is not {'above' if result['ties'] == 'fail' else 'at or above'} 0 "
                              f"on {' and '.join(failed)}")
    lines += ["", f"{verdict} at {level}: {why} (ties {result['ties']})"]
    return "\n".join(lines)
