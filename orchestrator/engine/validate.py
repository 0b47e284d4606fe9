"""Cross-section checks of an experiment config: things no single section can know on its own.

Runs before anything is written, so an impossible experiment never leaves a run directory behind.
"""

from __future__ import annotations

from orchestrator.config import ExperimentConfig, load_raw
from orchestrator.config.crossmodal import CrossModalExperiment, parse_any
from orchestrator.config.typed import require
from orchestrator.errors import ConfigError


def validate(cfg):
    """Every cross-section check of ``cfg`` (either kind of experiment); returns ``cfg``."""
    from orchestrator.reporting.tracking import check_tracking

    check_tracking(cfg.tracking)
    if isinstance(cfg, CrossModalExperiment):
        validate_crossmodal(cfg)
    else:
        validate_experiment(cfg)
    return cfg


def parse_experiment(data: dict):
    """A raw mapping, parsed and fully checked."""
    return validate(parse_any(data))


def load_experiment(config: str | None = None, overrides: list[str] = ()):
    """A config file (``None``: the quickstart) with ``--set`` overrides, parsed and fully checked."""
    return parse_experiment(load_raw(config, overrides))


def validate_crossmodal(cfg: CrossModalExperiment) -> None:
    """Both CLIPs exist (tag or file), every method's parameters and stage recipes are valid, and every
    method fits the new model (e.g. LoRA finds modules to adapt in each tower it is asked to)."""
    from methods.crossmodal_base import create_crossmodal
    from methods.nets.clip_models import check_clip_spec

    for role in ("old", "new"):
        spec = getattr(cfg.models, role)
        check_clip_spec(spec.name, spec.pretrained, f"models.{role}")
    for i, spec in enumerate(cfg.methods):
        method = create_crossmodal(spec.name, spec.params, f"methods.{i}")
        method.check_models(cfg.models.new.name, f"methods.{i}.params")
        for stage in method.stages():
            cfg.stage_training(i, stage)


def validate_experiment(cfg: ExperimentConfig) -> None:
    from methods.nets.backbones import list_backbones
    from methods.base import create_method, parse_params
    from orchestrator.data import dataset_num_classes
    from orchestrator.engine.scenarios import classes_needed, num_steps
    from orchestrator.engine.upstream import validate_replacements

    require(cfg.model.backbone in list_backbones(), "model.backbone",
            f"unknown backbone {cfg.model.backbone!r}; available: {', '.join(list_backbones())}")
    available = dataset_num_classes(cfg.data)
    sc = cfg.scenario
    require(sc.initial_classes <= available, "scenario.initial_classes",
            f"{sc.initial_classes} classes requested but dataset {cfg.data.dataset!r} has {available}")
    steps = num_steps(cfg, available)
    needed = classes_needed(cfg, steps)
    require(needed <= available, "scenario.num_steps",
            f"{steps} steps of {sc.initial_classes} + {sc.increment} per step need {needed} classes, "
            f"but dataset {cfg.data.dataset!r} has {available}; allowed: at most "
            f"{1 + (available - sc.initial_classes) // sc.increment}")
    require(cfg.service is None or steps >= 2, "service",
            f"simulates upgrades between versions, but the scenario has {steps} step; add steps or remove the section")
    _check_file_splits(cfg)
    for name, eval_set in cfg.evaluation.sets.items():
        if eval_set.data is not None:
            dataset_num_classes(eval_set.data)  # raises a clear error for a missing/unknown dataset
            require(eval_set.classes == "all", f"evaluation.sets.{name}.classes",
                    "'seen' needs the experiment's own dataset (classes of another dataset are never seen)")
    for index in cfg.resources.steps:
        require(0 <= index < steps, f"resources.steps.{index}", f"no such step; steps are 0..{steps - 1}")
    validate_replacements(cfg, steps)
    _check_index_dimension(cfg)
    _check_clip_sections(cfg, steps)
    _check_model_keys_are_read(cfg)
    for i, spec in enumerate(cfg.methods):
        parse_params(spec.name, spec.params, f"methods.{i}.params")
        method = create_method(spec.name, spec.params, cfg.model, f"methods.{i}")
        method.check_model("model")
        method.check_params(f"methods.{i}.params")
        source = method.weights_from()
        earlier = [s.key for s in cfg.methods[:i]]
        require(source is None or source in earlier, f"methods.{i}.params",
                f"takes the versions of method {source!r}, but no earlier method of the experiment has that label; "
                f"list it before this one (earlier labels: {', '.join(earlier) or 'none'})")
        require(cfg.evaluation.search.index is None or not method.upgrades_stored_vectors(), f"methods.{i}.params",
                "upgrades the stored vectors of older galleries, which an approximate index "
                "(evaluation.search.index) cannot serve; drop the index or use direction: new_to_old")
        cfg.method_training(spec)
        cfg.method_training(spec, step=1)
    if cfg.resources.use_gpu or any(r.use_gpu for r in cfg.resources.steps.values()):
        _check_gpu_request(cfg)


def _check_index_dimension(cfg: ExperimentConfig) -> None:
    """An approximate index that cannot hold the embeddings of a method that embeds at ``model.embedding_dim``
    (PQ codes wider than the vectors) fails here; methods with a width of their own are checked when their
    index is built, before it is written."""
    from methods.base import method_class

    index = cfg.evaluation.search.index
    if index is None:
        return
    for i, spec in enumerate(cfg.methods):
        keys = method_class(spec.name, f"methods.{i}.name").model_keys
        if keys is None or "embedding_dim" in keys:
            index.check_dimension(cfg.model.embedding_dim, "evaluation.search.index")


def _check_file_splits(cfg: ExperimentConfig) -> None:
    """Datasets read from files: both splits list and index cleanly (unreadable shards, missing columns,
    test labels that are not train classes), before any worker starts. Indexes are cached, so the
    workers reuse them."""
    from orchestrator.config.experiment import STREAMABLE_DATASETS
    from orchestrator.data.encoded import check_splits

    for data in [cfg.data, *(s.data for s in cfg.evaluation.sets.values())]:
        if data is not None and data.dataset in STREAMABLE_DATASETS:
            check_splits(data)


def _check_model_keys_are_read(cfg: ExperimentConfig) -> None:
    """A model key set to other than its default that no method of the experiment reads would do nothing
    (e.g. ``embedding_dim`` for ``stationary``, whose feature width is fixed by its d-Simplex): refuse it."""
    import dataclasses

    from methods.base import method_class
    from orchestrator.config import ModelConfig

    defaults = ModelConfig()
    classes = [method_class(spec.name, f"methods.{i}.name") for i, spec in enumerate(cfg.methods)]
    for field in dataclasses.fields(ModelConfig):
        if getattr(cfg.model, field.name) == getattr(defaults, field.name):
            continue
        if not any(cls.model_keys is None or field.name in cls.model_keys for cls in classes):
            names = ", ".join(sorted({cls.name for cls in classes}))
            raise ConfigError(f"model.{field.name}", f"does nothing for method(s) {names}, which do not read it; "
                                                     f"remove it (default: {getattr(defaults, field.name)!r})")


def _check_clip_sections(cfg: ExperimentConfig, steps: int) -> None:
    """An open_clip model that exists (tag or file), a class-names file naming every class, an upstream
    CLIP only on synthetic data, and session index files for every step."""
    from methods.nets.clip_models import check_clip_spec
    from orchestrator.data import class_names_of
    from orchestrator.data.display_names import display_names
    from orchestrator.engine.session_files import session_file_paths

    if cfg.model.name is not None:
        check_clip_spec(cfg.model.name, cfg.model.pretrained, "model")
    if cfg.data.class_names_file is not None:
        display_names(cfg.data, class_names_of(cfg.data))
    require(cfg.upstream_clip is None or cfg.data.dataset == "synthetic", "upstream_clip",
            f"pretrains on captioned synthetic images; with data.dataset {cfg.data.dataset!r} set "
            f"model.pretrained (an open_clip tag or a checkpoint file) instead")
    if cfg.scenario.session_files is not None:
        session_file_paths(cfg.scenario.session_files, steps)


def _check_gpu_request(cfg: ExperimentConfig) -> None:
    if cfg.resources.num_workers == 0:
        raise ConfigError("resources.use_gpu", "in-process training (num_workers: 0) uses the driver's device; "
                                               "set num_workers >= 1 to request GPUs from Ray")
