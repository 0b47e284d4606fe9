"""Models trained elsewhere: replacement checkpoints and the upstream stage that trains them reproducibly.

A scenario swaps a replacement model in at each step of ``scenario.replace_at``
(docs/methods/stationary.md). A replacement is a checkpoint file — checked against its pinned SHA-256
and test-loaded into every method's network before the run directory exists — or upstream model k:
each method's own network trained on the first ``upstream.classes[k]`` classes of ``upstream.data``.
Unlike the reference, whose checkpoints come from an unversioned link with no recipe, the upstream recipe
is part of the config: each upstream model is a one-step experiment in ``RUN_DIR/upstream/<digest>/``
(its own config, report and accuracy), a run of the experiment's task graph (orchestrator/engine/graph.py)
that the replacing step depends on, trained once and found again by the digest of its recipe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from orchestrator.storage import runfiles
from orchestrator.config.typed import from_dict, require, to_dict
from orchestrator.config import (EvalSetConfig, EvaluationConfig, ExperimentConfig, MethodSpec, ResourcesConfig,
                                 ScenarioConfig, TrainingConfig)
from orchestrator.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from methods.base import Weights


def validate_replacements(cfg: ExperimentConfig, num_steps: int) -> None:
    """Cross-section checks (cheap, no file is read): steps exist, upstream models exist and fit their data."""
    from orchestrator.data import dataset_num_classes

    sc = cfg.scenario
    require(all(at < num_steps for at in sc.replace_at), "scenario.replace_at",
            f"{sc.replace_at} names steps beyond the last one; steps are 0..{num_steps - 1}")
    up = cfg.upstream
    for i, source in enumerate(sc.replacements):
        if source.upstream is None:
            continue
        require(up is not None, f"scenario.replacements.{i}.upstream", "needs an 'upstream' section (the recipe)")
        require(source.upstream < len(up.classes), f"scenario.replacements.{i}.upstream",
                f"no upstream model {source.upstream}; upstream.classes lists {len(up.classes)}")
    if up is None:
        return
    try:
        available = dataset_num_classes(up.data)
    except ConfigError as exc:
        raise ConfigError(f"upstream.{exc.key}", exc.message) from None
    require(max(up.classes) <= available, "upstream.classes",
            f"an upstream model needs {max(up.classes)} classes but dataset {up.data.dataset!r} has {available}")
    upstream_training(cfg)


def upstream_training(cfg: ExperimentConfig) -> TrainingConfig:
    """The experiment's training section with the upstream recipe's overrides applied and validated."""
    return from_dict(TrainingConfig, {**to_dict(cfg.training), **cfg.upstream.training}, "upstream.training")


def upstream_config(cfg: ExperimentConfig, spec: MethodSpec, index: int) -> ExperimentConfig:
    """The one-step experiment that trains upstream model ``index`` for ``spec``'s method. It depends only
    on the recipe, the model section and the method (not on the experiment's name), so its digest is a
    cache key."""
    from methods.base import method_class

    up, res = cfg.upstream, cfg.resources
    classes = up.classes[index]
    return ExperimentConfig(
        name=f"upstream-{spec.name}-{classes}-classes",
        seed=upstream_seed(cfg.seed if up.seed is None else up.seed, index),
        data=up.data,
        scenario=ScenarioConfig(initial_classes=classes, increment=1, num_steps=1),
        model=cfg.model,
        training=upstream_training(cfg),
        resources=ResourcesConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                  cpus_per_worker=res.cpus_per_worker, max_failures=res.max_failures),
        evaluation=EvaluationConfig(sets={"test": EvalSetConfig(split="test", classes="seen")}),
        methods=[MethodSpec(name=spec.name, params=method_class(spec.name).upstream_params(spec.params))],
    )


def upstream_seed(seed: int, index: int) -> int:
    """Seed of upstream model ``index``: distinct per model and from the scenario's own steps, so models
    trained elsewhere never share an initialisation with each other or with the scenario."""
    return seed + 1000 * (index + 1)


def replacement_checkpoint(cfg: ExperimentConfig, run: runfiles.Run, spec: MethodSpec, step: int) -> Optional[Weights]:
    """The model swapped in at ``step`` for ``spec``'s method, or None when ``step`` is no replacement: the
    user's checkpoint file, or upstream model k as stored in the run (on whatever filesystem it lives)."""
    sc = cfg.scenario
    if step not in sc.replace_at:
        return None
    source = sc.replacements[sc.replace_at.index(step)]
    if source.checkpoint is not None:
        return source.checkpoint
    sub = upstream_config(cfg, spec, source.upstream)
    return runfiles.version_checkpoint(runfiles.upstream_dir(run, sub.digest()), sub.methods[0].key, 0)


def check_replacements(cfg: ExperimentConfig) -> None:
    """Check each pinned digest and load each replacement checkpoint into every method's network at its
    step, so a missing, unsafe, corrupt or ill-fitting file fails before anything is written."""
    from methods.base import StepContext, checkpoint_file, create_method
    from orchestrator.data import dataset_num_classes
    from orchestrator.engine.scenarios import plan_steps

    sc = cfg.scenario
    files = [(at, source) for at, source in zip(sc.replace_at, sc.replacements) if source.checkpoint is not None]
    for _, source in files:
        if source.sha256 is not None:
            _check_digest(checkpoint_file(source.checkpoint), source.sha256)
    steps = plan_steps(cfg, dataset_num_classes(cfg.data)) if files else []
    for i, spec in enumerate(cfg.methods if files else []):
        method = create_method(spec.name, spec.params, cfg.model, key=f"methods.{i}")
        for at, source in files:
            step = steps[at]
            ctx = StepContext(index=at, num_steps=len(steps), num_seen=step.num_seen, num_previous=step.num_previous,
                              event=step.event, model=cfg.model, training=cfg.method_training(spec), seed=cfg.seed,
                              init_checkpoint=source.checkpoint)
            with torch.random.fork_rng(devices=[]):
                try:
                    method.init_model(ctx)
                except CheckpointError as exc:
                    raise CheckpointError(f"replacement at step {at} for method {spec.key!r}: {exc}") from None


def _check_digest(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise CheckpointError(f"checkpoint {path} has SHA-256 {digest.hexdigest()}, but the config pins {expected}")
