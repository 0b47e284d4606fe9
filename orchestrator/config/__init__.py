"""Experiment configuration: typed sections, YAML with --set overrides, checks with key paths."""

from orchestrator.config.experiment import (  # noqa: F401
    BUILTIN_CONFIG_DIR,
    DataConfig,
    EvalSetConfig,
    EvaluationConfig,
    ReplayConfig,
    ReplacementSource,
    ScenarioConfig,
    ModelConfig,
    TrainingConfig,
    StepResources,
    ResourcesConfig,
    MethodSpec,
    UpstreamClipConfig,
    UpstreamConfig,
    ExperimentConfig,
    apply_override,
    set_key,
    resolve_config_path,
    load_raw,
    parse_config,
    load_config,
)
from orchestrator.config.service import PopularityConfig, ServiceConfig  # noqa: F401
