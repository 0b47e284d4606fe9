"""Typed config of a cross-modal compatibility experiment (``kind: cross-modal`` at the top of the YAML).

One experiment: an old and a new CLIP, a captioned evaluation set whose old-model embeddings are the
gallery, a caption corpus (stage ``text``), image-caption pairs (stage ``pairs``), and the methods that
map new queries into the old space. Validation (schema, files, models, method params) runs before
anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from orchestrator.config.typed import from_dict, require, require_name, to_dict
from orchestrator.config import DataConfig, MethodSpec, ResourcesConfig, TrainingConfig, UpstreamClipConfig
from orchestrator.config.experiment import config_digest
from orchestrator.config.tracking import TrackingConfig

KIND = "cross-modal"
RESERVED_KEYS = ("old", "new")  # store keys of the two models' own embeddings


@dataclass
class ClipSpec:
    """An open_clip model: architecture + open_clip tag or local checkpoint, or an offline upstream CLIP
    pretrained on the synthetic captioned data (``upstream``; instance captions, see
    orchestrator/data/instance_captions.py)."""

    name: str  # an open_clip architecture (e.g. ViT-B-32) or a shipped tiny one (tiny-vit-w32)
    pretrained: Optional[str] = None  # an open_clip tag (e.g. openai) or a local checkpoint file; None: random weights
    upstream: Optional[UpstreamClipConfig] = None  # offline: pretrain the model on the synthetic captioned data first

    def __post_init__(self):
        require(self.upstream is None or self.pretrained is None, "upstream",
                "pretrains from random weights; leave pretrained unset")


@dataclass
class ModelsConfig:
    old: ClipSpec  # the CLIP that embedded the deployed gallery (images and captions)
    new: ClipSpec  # the CLIP whose queries must search that gallery


@dataclass
class CaptionSource:
    """A caption annotation file (Karpathy .json, .csv, .jsonl) or, for the corpus, also a .txt corpus."""

    path: str  # Karpathy .json, .csv (image, caption columns) or .jsonl; the corpus may be a .txt, one caption a line
    image_root: Optional[str] = None  # default: the annotation file's directory
    splits: Optional[list[str]] = None  # Karpathy JSON only; None = every split


@dataclass
class CrossModalDataConfig:
    """Where the evaluation set, the corpus (stage ``text``) and the pairs (stage ``pairs``) come from.

    ``synthetic``: evaluation on the test split of the instance-captioned synthetic dataset, corpus and
    pairs from its train split. ``files``: ``eval``, ``corpus`` and ``pairs`` name annotation files.
    """

    source: Literal["synthetic", "files"] = "synthetic"  # files: eval, corpus and pairs name annotation files
    synthetic: DataConfig = field(default_factory=DataConfig)
    captions_per_image: int = 5  # synthetic only
    eval: Optional[CaptionSource] = None
    corpus: Optional[CaptionSource] = None
    pairs: Optional[CaptionSource] = None
    corpus_size: Optional[int] = None  # distinct captions used by stage text (seeded draw; None = all)
    pair_count: int = 1000  # images (each with all its captions) used by stage pairs, a seeded draw
    image_size: Optional[int] = None  # files only: decode size; None = the new model's input size

    def __post_init__(self):
        require(self.pair_count >= 2, "pair_count", "must be >= 2 (contrastive pairs need negatives)")
        require(self.corpus_size is None or self.corpus_size >= 2, "corpus_size", "must be >= 2")
        require(1 <= self.captions_per_image <= 8, "captions_per_image", "must be in 1..8")
        for role in ("eval", "corpus", "pairs"):
            given = getattr(self, role) is not None
            if self.source == "files":
                require(given, role, "is required when source is 'files'")
            else:
                require(not given, role, "only applies to source 'files'")


@dataclass
class StageTrainingConfig:
    """Training recipe of each stage kind (methods override per stage in ``methods[i].training``)."""

    text: TrainingConfig = field(default_factory=lambda: TrainingConfig(epochs=20, batch_size=256, lr=1e-3))
    pairs: TrainingConfig = field(default_factory=lambda: TrainingConfig(epochs=10, batch_size=64, lr=1e-4))


@dataclass
class CrossModalEvaluationConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # the K of Recall@K
    ties: Literal["fail", "pass"] = "fail"  # compatibility: whether new->old == old->old counts as a pass
    batch_size: int = 256  # images or captions per embedding batch

    def __post_init__(self):
        require(bool(self.ks) and all(k >= 1 for k in self.ks), "ks", "needs one or more K >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class CrossModalExperiment:
    """One cross-modal experiment: one config file, one run directory (one sub-directory per seed)."""

    kind: Literal["cross-modal"]  # marks the config as a cross-modal experiment
    name: str  # the run directory is <output_dir>/<name>; a safe name (letters, digits, . _ -)
    models: ModelsConfig
    seeds: list[int] = field(default_factory=lambda: [0])  # one seed-S/ directory per seed; metrics as mean ± std
    output_dir: str = "runs"  # where the run goes (<output_dir>/<name>): a path, or s3://bucket/prefix, gs://bucket/prefix
    data: CrossModalDataConfig = field(default_factory=CrossModalDataConfig)
    training: StageTrainingConfig = field(default_factory=StageTrainingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    evaluation: CrossModalEvaluationConfig = field(default_factory=CrossModalEvaluationConfig)
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec(name="procrustes"), MethodSpec(name="xbt")])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow / W&B / TensorBoard; not in the digest

    def __post_init__(self):
        require_name(self.name, "name")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds", "needs distinct seeds")
        require(bool(self.methods), "methods", "needs at least one method")
        keys = [m.key for m in self.methods]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        require(not dup, "methods", f"duplicate method label(s) {dup}; give each a distinct 'label'")
        clash = sorted(set(keys) & set(RESERVED_KEYS))
        require(not clash, "methods", f"labels {clash} are reserved for the models' own embeddings")
        require(not self.resources.steps, "resources.steps", "per-step resources do not apply to cross-modal runs")

    def stage_training(self, index: int, stage: str) -> TrainingConfig:
        """``training.<stage>`` with ``methods[index].training.<stage>`` overrides applied and validated."""
        spec = self.methods[index]
        overrides = spec.training.get(stage, {})
        require(set(spec.training) <= {"text", "pairs"}, f"methods.{index}.training",
                "holds per-stage overrides: keys 'text' and/or 'pairs'")
        merged = {**to_dict(getattr(self.training, stage)), **overrides}
        return from_dict(TrainingConfig, merged, f"methods.{index}.training.{stage}")

    def to_dict(self) -> dict:
        return to_dict(self)

    def digest(self) -> str:
        return config_digest(self)


def parse_crossmodal(data: dict) -> CrossModalExperiment:
    """A raw mapping as typed sections (schema and in-section checks); the model specs and every method's
    parameters are checked by :func:`orchestrator.engine.validate.validate`."""
    cfg = from_dict(CrossModalExperiment, data)
    for role in ("old", "new"):
        spec: ClipSpec = getattr(cfg.models, role)
        require(spec.upstream is None or cfg.data.source == "synthetic", f"models.{role}.upstream",
                "pretrains on the synthetic captioned data; use pretrained (a tag or a file) with data.source 'files'")
    return cfg


def parse_any(data: dict):
    """A cross-modal or a class-incremental experiment, by the mapping's ``kind``."""
    from orchestrator.config.experiment import parse_config

    return parse_crossmodal(data) if is_crossmodal(data) else parse_config(data)


def is_crossmodal(data: dict) -> bool:
    """Whether a raw config mapping declares a cross-modal experiment."""
    return isinstance(data, dict) and data.get("kind") == KIND
