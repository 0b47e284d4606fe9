"""Typed experiment config: YAML in, validated dataclasses out, every error naming its key path.

Nothing is written to disk until :func:`load_config` has returned, so an invalid config never leaves
a half-made run directory behind.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from orchestrator.config.service import ServiceConfig
from orchestrator.config.tracking import TrackingConfig
from orchestrator.config.typed import explicit_dict, from_dict, require, require_name, to_dict
from orchestrator.errors import ConfigError, ConfigWarning

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/ (editable install)


# encoded files read by sample (orchestrator/data/formats.py), in memory or streamed
STREAMABLE_DATASETS = ("imagefolder", "parquet", "webdataset", "huggingface")
SPLIT_DIRECTORIES = {"train": "train", "test": "test"}  # data.splits' default


@dataclass
class DataConfig:
    """Which dataset to read and how to transform it."""

    # synthetic (built in, generated and cached), cifar10, cifar100, imagefolder (train|test/<class>/<image>),
    # parquet (train|test/*.parquet, columns image and label), webdataset (train|test/*.tar, <key>.png + <key>.cls)
    # or huggingface (what datasets' save_to_disk writes: train|test/data-*.arrow)
    dataset: str = "synthetic"
    # cifar10/cifar100: a local directory; imagefolder, parquet, webdataset, huggingface: a directory or a URI
    # (s3://, gs://, ...)
    root: Optional[str] = None
    # imagefolder/parquet/webdataset/huggingface: the directories under root that hold the train and test splits,
    # e.g. {test: validation} for a Hugging Face dataset whose held-out labelled split is "validation"
    splits: dict[str, str] = field(default_factory=lambda: dict(SPLIT_DIRECTORIES))
    download: bool = False  # CIFAR only: fetch when missing (needs network)
    num_classes: int = 20  # synthetic only
    train_per_class: int = 120  # synthetic only
    test_per_class: int = 30  # synthetic only
    image_size: int = 32  # synthetic generates this size; others are resized to it when it differs
    augment: bool = True  # random crop (padding 4) + horizontal flip on training data
    normalization: Literal["dataset", "cifar100", "imagenet", "none"] = "dataset"  # mean/std: the data's own or fixed
    difficulty: float = 1.0  # synthetic only: scales the within-class noise and the similarity of sibling classes
    variant: int = 0  # synthetic only: a different variant draws a different (but equally hard) dataset
    # synthetic only: K super-class prototypes shared by every variant with the same K (class c belongs to
    # super-class c % K), so class c of one variant is a relative of class c of another, as CIFAR-10's
    # classes are of ImageNet's; None: each variant draws super-classes of its own (variants share nothing)
    super_classes: Optional[int] = None
    class_names_file: Optional[str] = None  # lines "<class> <name used in text>" (e.g. wnid -> WordNet name)
    # memory: decode each split once into one array per worker; stream: read batches through Ray Data
    # (imagefolder, parquet, webdataset, huggingface), decoded by Ray tasks, never the whole split in one process;
    # auto: stream when a split decoded would exceed memory_limit_gb (file-backed datasets only)
    loading: Literal["memory", "stream", "auto"] = "auto"
    memory_limit_gb: float = 4.0  # auto only: the decoded size (images x image_size^2 x 3 bytes) above which to stream
    # an image that cannot be read or decoded: error stops the run naming the file; skip (the file-backed
    # kinds) decodes every image once when a split is indexed and leaves the bad ones out, counted in the report
    bad_images: Literal["error", "skip"] = "error"
    # streamed splits: the nodes whose CPUs decode the images. cpu_nodes: only the cluster's CPU-only worker
    # nodes (no GPU; not the head); anywhere: wherever Ray finds free CPUs, GPU nodes included; auto:
    # cpu_nodes when the cluster has such nodes next to GPU nodes, else anywhere
    decode_on: Literal["auto", "cpu_nodes", "anywhere"] = "auto"

    def __post_init__(self):
        require(self.num_classes >= 2, "num_classes", f"must be >= 2, got {self.num_classes}")
        require(self.train_per_class >= 1, "train_per_class", "must be >= 1")
        require(self.test_per_class >= 1, "test_per_class", "must be >= 1")
        require(self.image_size >= 8, "image_size", "must be >= 8")
        require(self.difficulty > 0, "difficulty", "must be > 0")
        require(self.super_classes is None or self.super_classes >= 1, "super_classes", "must be >= 1")
        require(self.super_classes is None or self.dataset == "synthetic", "super_classes",
                f"only applies to the synthetic dataset, not {self.dataset!r}; remove it")
        require(self.memory_limit_gb > 0, "memory_limit_gb", "must be > 0")
        unknown = sorted(set(self.splits) - set(SPLIT_DIRECTORIES))
        require(not unknown, "splits", f"maps the splits train and test to directories; {unknown} is not a split")
        self.splits = {**SPLIT_DIRECTORIES, **self.splits}  # {test: validation} keeps train: train
        for split, directory in self.splits.items():
            require(bool(directory) and not directory.startswith("/") and ".." not in directory.split("/")
                    and "?" not in directory, f"splits.{split}",
                    f"must be a directory relative to data.root, got {directory!r}")
        require(self.splits == SPLIT_DIRECTORIES or self.dataset in STREAMABLE_DATASETS, "splits",
                f"only applies to the file-backed datasets ({', '.join(STREAMABLE_DATASETS)}), not {self.dataset!r}")
        require(self.loading != "stream" or self.dataset in STREAMABLE_DATASETS, "loading",
                f"only the file-backed datasets ({', '.join(STREAMABLE_DATASETS)}) stream; dataset "
                f"{self.dataset!r} is loaded into memory (set loading: memory or auto)")
        require(self.bad_images == "error" or self.dataset in STREAMABLE_DATASETS, "bad_images",
                f"only the file-backed datasets ({', '.join(STREAMABLE_DATASETS)}) can hold bad images; dataset "
                f"{self.dataset!r} has none to skip (remove it)")
        require(self.decode_on == "auto" or (self.dataset in STREAMABLE_DATASETS and self.loading != "memory"),
                "decode_on", f"places the decoding of streamed splits, but dataset {self.dataset!r} with loading "
                             f"{self.loading!r} is decoded in memory; remove it")


@dataclass
class EvalSetConfig:
    """One evaluation set: a split of the training dataset, or of another dataset."""

    split: Literal["train", "test"] = "test"  # split of the dataset the set is drawn from
    data: Optional[DataConfig] = None  # None: the experiment's dataset
    classes: Literal["all", "seen"] = "all"  # seen: only classes trained on up to the embedding version


@dataclass
class SearchIndexConfig:
    """An approximate faiss index, built once from each gallery version's vectors and never rebuilt: every
    later version's queries search it, as a service that does not backfill does. Its metrics are reported
    beside the exact ones (``index_cmc1``, ``index_map100``, ...)."""

    type: Literal["ivf-flat", "ivf-pq", "hnsw"] = "hnsw"  # inverted lists of full vectors or of PQ codes, or an HNSW graph
    nlist: Optional[int] = None  # ivf-*: k-means cells (trained on up to 64 gallery items each); None: √N for N items
    # ivf-*: cells visited per query; None: the fewest (1, 2, 4, ...) whose lists reach target_recall
    nprobe: Optional[int] = None
    pq_m: int = 16  # ivf-pq: sub-quantizers per vector (codes of pq_m × pq_bits bits); must divide the dimension
    pq_bits: int = 8  # ivf-pq: bits per sub-quantizer code
    hnsw_m: int = 32  # hnsw: graph neighbours per node
    ef_construction: int = 40  # hnsw: candidate list while building (the build is single-threaded: reproducible)
    # hnsw: candidate list while searching (at least the search depth); None: the shortest (k, 2k, 4k, ...)
    # whose lists reach target_recall
    ef_search: Optional[int] = None
    # nprobe/ef_search: None only: recall@k of the index's lists against the exact lists, over up to 1000
    # of the gallery's own vectors as queries, that the tuned value reaches when the index is built
    target_recall: float = 0.9

    def __post_init__(self):
        require(self.nlist is None or self.nlist >= 1, "nlist", "must be >= 1")
        require(self.nprobe is None or self.nprobe >= 1, "nprobe", "must be >= 1")
        require(self.nlist is None or self.nprobe is None or self.nprobe <= self.nlist, "nprobe",
                f"visits at most nlist ({self.nlist}) cells, got {self.nprobe}")
        require(self.pq_m >= 1, "pq_m", "must be >= 1")
        require(1 <= self.pq_bits <= 16, "pq_bits", "must be in 1..16")
        require(self.hnsw_m >= 2, "hnsw_m", "must be >= 2")
        require(self.ef_construction >= 1, "ef_construction", "must be >= 1")
        require(self.ef_search is None or self.ef_search >= 1, "ef_search", "must be >= 1")
        require(0 < self.target_recall <= 1, "target_recall", f"must be in (0, 1], got {self.target_recall}")

    def check_dimension(self, dim: int, key: str) -> None:
        """ConfigError (at ``key``) unless vectors of ``dim`` coordinates fit this index: PQ splits each vector
        into pq_m equal sub-vectors, so pq_m must divide ``dim`` (and cannot exceed it)."""
        if self.type == "ivf-pq":
            require(self.pq_m <= dim and dim % self.pq_m == 0, f"{key}.pq_m",
                    f"{self.pq_m} sub-quantizers cannot split {dim}-dimensional embeddings; use a divisor of {dim}")


@dataclass
class SearchConfig:
    """How a matrix cell ranks the gallery: the exact full ranking, or exact faiss top-k search for large
    galleries; optionally also through an approximate index."""

    # exact: full ranking (cmc1, cmc5, map); faiss: exact top-k inner-product search (cmc1, cmc5, cmc<k>,
    # map<k>, mapR); auto: faiss when the gallery holds more than exact_max_gallery items
    engine: Literal["auto", "exact", "faiss"] = "auto"
    exact_max_gallery: int = 50000  # auto only: the largest gallery ranked in full
    k: int = 100  # faiss and index: depth of each query's result list, the k of CMC top-k and mAP@k (cmc<k>, map<k>)
    index: Optional[SearchIndexConfig] = None  # also search an approximate index built once per gallery version

    def __post_init__(self):
        require(self.exact_max_gallery >= 1, "exact_max_gallery", "must be >= 1")
        require(self.k >= 5, "k", f"must be >= 5 (cmc5 needs the top 5), got {self.k}")


@dataclass
class EvaluationConfig:
    """How each matrix entry is computed from the store."""

    protocol: Literal["leave-one-out", "query-gallery"] = "leave-one-out"  # leave-one-out: queries are the gallery
    # the evaluation sets by name (each a safe name: letters, digits, . _ -; it names store partitions)
    sets: dict[str, EvalSetConfig] = field(default_factory=lambda: {"test": EvalSetConfig()})
    query: str = "test"  # name of the evaluation set whose images are the queries
    gallery: Optional[str] = None  # query-gallery only
    templates: bool = False  # query-gallery: reduce the gallery to L2-normalised class means
    # the metric listed first in summaries and drawn in the heatmaps; verdicts are reported on every metric
    primary: Literal["cmc1", "cmc5", "map"] = "cmc1"
    # ECC everywhere (AC, per-pair flags, reports, compat compare): whether M[i][j] == M[j][j] counts as
    # compatible; fail (default): the strict criterion, as iamcl2r's published AC; pass: CL2R's convention
    ties: Literal["fail", "pass"] = "fail"
    # mAP only, for gallery items with equal similarity; lower-index (default): the lower gallery index
    # ranks first, as in CMC; shared: a tie is one threshold and all its items get the precision after
    # the whole tie (as scikit-learn's average_precision_score counts ties)
    map_ties: Literal["lower-index", "shared"] = "lower-index"
    batch_size: int = 256  # images per embedding batch
    # health check: a version whose top-1 accuracy on the classes its own step added is below this fraction
    # of its accuracy on the classes it knew before gets a warning in every report (0 turns the check off)
    min_new_class_ratio: float = 0.5
    search: SearchConfig = field(default_factory=SearchConfig)  # full ranking or faiss top-k; approximate index

    def __post_init__(self):
        require(bool(self.sets), "sets", "needs at least one evaluation set")
        if self.search.engine == "faiss":
            require(self.primary != "map", "primary",
                    "faiss top-k search gives cmc1, cmc5 and mAP@k, not the full-ranking mAP; use search.engine: "
                    "exact (or auto), or primary: cmc1 / cmc5")
            require(self.map_ties == "lower-index", "map_ties",
                    "faiss top-k metrics rank ties by the lower gallery index; leave map_ties unset")
        if self.templates:
            require(self.search.engine != "faiss" and self.search.index is None, "search",
                    "class-mean templates are ranked exactly (the gallery is one vector per class); remove "
                    "search.engine: faiss and search.index")
        for name in self.sets:
            require_name(name, f"sets.{name}")
        require(0.0 <= self.min_new_class_ratio <= 1.0, "min_new_class_ratio", "must be between 0 and 1")
        require(self.query in self.sets, "query", f"{self.query!r} is not one of sets: {', '.join(self.sets)}")
        if self.protocol == "query-gallery":
            require(self.gallery is not None, "gallery", "is required for protocol 'query-gallery'")
            require(self.gallery in self.sets, "gallery", f"{self.gallery!r} is not one of sets: {', '.join(self.sets)}")
            require(not self.templates or self.primary == "cmc1", "primary",
                    "class-mean templates give top-1 only; use primary: cmc1")
            require(not self.templates or self.map_ties == "lower-index", "map_ties",
                    "class-mean templates give top-1 only, there is no mAP; leave map_ties unset")
        else:
            require(self.gallery in (None, self.query), "gallery",
                    "leave-one-out uses the query set as gallery; leave it unset")
            require(not self.templates, "templates", "only applies to protocol 'query-gallery'")


@dataclass
class ReplayConfig:
    """Replay memory: random exemplars of each finished step's new classes, mixed into later batches."""

    per_class: int = 20  # fixed quota per class, never redistributed
    batch_share: float = 0.5  # fraction of every training batch drawn from the memory (after step 0)

    def __post_init__(self):
        require(self.per_class >= 1, "per_class", "must be >= 1")
        require(0 < self.batch_share < 1, "batch_share", "must be in (0, 1): batches mix memory and new data")


@dataclass
class ReplacementSource:
    """A model trained elsewhere: a checkpoint file (or version directory), or upstream model k."""

    checkpoint: Optional[str] = None  # .safetensors, or a tensors-only .pt (loaded with weights_only=True)
    sha256: Optional[str] = None  # pins the checkpoint file's digest; a mismatch fails before training
    upstream: Optional[int] = None  # index into upstream.classes: trained by the experiment's upstream stage

    def __post_init__(self):
        require((self.checkpoint is None) != (self.upstream is None), "",
                "a replacement needs exactly one of 'checkpoint' (a file) or 'upstream' (an upstream model index)")
        if self.checkpoint is not None:  # absolute, so workers started elsewhere find the same file
            self.checkpoint = str(Path(self.checkpoint).expanduser().resolve())
        require(self.sha256 is None or self.checkpoint is not None, "sha256", "only applies to a 'checkpoint'")
        require(self.upstream is None or self.upstream >= 0, "upstream", "must be >= 0")


@dataclass
class ScenarioConfig:
    """The ordered steps: which classes each step trains on and what happens to the model."""

    kind: Literal["class-incremental", "few-shot"] = "class-incremental"  # few-shot: `shots` images per new class
    initial_classes: int = 10  # classes of the first step (the base session)
    increment: int = 5  # new classes per later step (N-way in few-shot)
    num_steps: Optional[int] = None  # None: as many steps as the classes allow
    class_order: Literal["natural", "seeded"] = "natural"  # natural: 0, 1, 2, ...; seeded: a permutation from the seed
    training_data: Literal["cumulative", "new"] = "cumulative"  # cumulative = all data of every seen class
    event: Literal["train", "finetune"] = "train"  # model event of steps after the first
    shots: Optional[int] = None  # few-shot: training examples per new class after the base step
    replay: Optional[ReplayConfig] = None  # replay memory of earlier steps' classes (needs training_data: new)
    replace_at: list[int] = field(default_factory=list)  # steps that start from a model trained elsewhere
    replacements: list[ReplacementSource] = field(default_factory=list)  # one per replace_at entry
    session_files: Optional[str] = None  # directory of session_1.txt..session_T.txt (CEC format): images per step

    def __post_init__(self):
        require(self.session_files is None or self.class_order == "natural", "class_order",
                "session_files define the class order; leave class_order at 'natural'")
        require(self.initial_classes >= 1, "initial_classes", "must be >= 1")
        require(self.increment >= 1, "increment", "must be >= 1")
        require(self.num_steps is None or self.num_steps >= 1, "num_steps", "must be >= 1")
        require(self.replay is None or self.training_data == "new", "replay",
                "needs training_data: new (cumulative steps already see every earlier sample)")
        require(all(b > a for a, b in zip(self.replace_at, self.replace_at[1:])) and min(self.replace_at, default=0) >= 0,
                "replace_at", f"must list step indices >= 0 in increasing order, got {self.replace_at}")
        require(len(self.replacements) == len(self.replace_at), "replacements",
                f"needs one entry per replace_at step ({len(self.replace_at)}), got {len(self.replacements)}")
        if self.kind == "few-shot":
            require(self.shots is not None and self.shots >= 1, "shots", "few-shot scenarios need shots >= 1")
        else:
            require(self.shots is None, "shots", "only applies to kind 'few-shot'")


@dataclass
class ModelConfig:
    """The backbone every method builds its network around."""

    backbone: str = "small_cnn"  # small_cnn (fast), or torchvision resnet18 / resnet50
    embedding_dim: int = 64  # width of the linear embedding layer on the pooled features
    stem: Literal["cifar", "imagenet"] = "cifar"  # resnets: 3x3 conv without max-pool, or the ImageNet stem
    final_relu: bool = False  # ReLU after the embedding layer
    normalize: bool = True  # L2-normalise the embedding before the classifier
    embedding_bn: bool = False  # BatchNorm1d on the embedding (centres it)
    width: int = 32  # small_cnn only: channels of the first block
    name: Optional[str] = None  # CLIP methods: an open_clip architecture (e.g. ViT-B-16-quickgelu, tiny-vit-w64)
    # CLIP methods: an open_clip tag (e.g. openai) or a local checkpoint file; unset: random weights drawn
    # from one fixed seed, so the frozen CLIP is the same network in every session and run
    pretrained: Optional[str] = None

    def __post_init__(self):
        require(self.embedding_dim >= 2, "embedding_dim", "must be >= 2")
        require(self.width >= 4, "width", "must be >= 4")
        require(self.pretrained is None or self.name is not None, "pretrained", "needs model.name (the architecture)")


@dataclass
class TrainingConfig:
    """Optimisation recipe of one step."""

    epochs: int = 8  # epochs per step
    # per worker: a step with N workers trains on batches of N x batch_size; each epoch's last partial
    # batch is dropped, except in few-shot scenarios (every shot is seen every epoch)
    batch_size: int = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"  # a fresh optimiser for every step
    lr: float = 1e-3  # peak learning rate, set per epoch
    weight_decay: float = 0.0  # applied by the optimiser to every trainable parameter
    momentum: float = 0.9  # sgd only
    schedule: Literal["cosine", "constant"] = "cosine"  # per epoch: cosine from lr to min_lr after the warm-up
    warmup_epochs: int = 0  # linear warm-up lr·(e+1)/W over the first W epochs
    min_lr: float = 0.0  # the cosine schedule's last value
    # of the methods' cross-entropy terms; unset: each method's reference value (0.1 for independent,
    # bct and oca; 0, plain cross-entropy, for stationary, er, zero_shot_clip and cpe_clip)
    label_smoothing: Optional[float] = None
    lr_schedule: Optional[list[float]] = None  # explicit lr of each epoch; replaces lr/schedule/warm-up when set
    incremental: dict[str, Any] = field(default_factory=dict)  # overrides of this section for every step after the first
    # arithmetic of the forward and the loss: fp32, or autocast to bf16 or fp16 (fp16 with a gradient scaler);
    # weights and optimiser state stay fp32. Both work on CPU too; whether they are faster depends on the
    # processor (docs/performance.md, "On a GPU")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NHWC memory format for the network and its image batches (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the network before training (slow first batches, faster later ones)

    def __post_init__(self):
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.lr_schedule is None or len(self.lr_schedule) >= self.epochs, "lr_schedule",
                f"lists {len(self.lr_schedule or [])} learning rates but training runs {self.epochs} epochs")
        require(all(v > 0 for v in self.lr_schedule or []), "lr_schedule", "learning rates must be > 0")
        require("incremental" not in self.incremental, "incremental.incremental", "cannot be nested")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.label_smoothing is None or 0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        require(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0, "warmup_epochs",
                f"must be smaller than epochs ({self.epochs})")
        require(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")


@dataclass
class StepResources:
    """Ray resources of a step; unset fields fall back to the experiment-wide values."""

    num_workers: Optional[int] = None  # None: resources.num_workers
    use_gpu: Optional[bool] = None  # None: resources.use_gpu
    cpus_per_worker: Optional[float] = None  # None: resources.cpus_per_worker


@dataclass
class ResourcesConfig:
    """Ray Train resources. ``num_workers: 0`` trains in the driver process (fast for tiny steps)."""

    num_workers: int = 1  # DDP workers per step (gloo on CPU, NCCL on GPU); 0 trains in the driver, no Ray cluster
    use_gpu: bool = False  # one GPU per worker; batch transforms run on the device
    cpus_per_worker: float = 1.0  # logical CPUs per worker, also its torch thread count
    max_failures: int = 0  # worker-group restarts Ray Train allows per group of steps; -1 retries forever
    steps: dict[int, StepResources] = field(default_factory=dict)  # per-step overrides, by step index
    group_steps: bool = True  # consecutive steps with equal resources share one worker group
    share_first_version: bool = True  # a method whose version 0 is an earlier method's copies it, untrained

    def __post_init__(self):
        require(self.num_workers >= 0, "num_workers", "must be >= 0 (0 runs in-process)")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 retries forever)")
        for index, res in self.steps.items():
            require(res.num_workers is None or res.num_workers >= 0, f"steps.{index}.num_workers", "must be >= 0")


@dataclass
class MethodSpec:
    """One method to simulate: a registry name, a display label and its hyperparameters."""

    name: str  # a registered method: independent, bct, oca, stationary, er, cpe_clip, zero_shot_clip, ...
    # display name and key in the run (None: name), a safe name (letters, digits, . _ -); lets one method
    # run with several params
    label: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)  # the method's hyperparameters (Method parameters below)
    # overrides of the experiment's training section (cross-modal: per stage, {text: {...}, pairs: {...}})
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.label is not None:
            require_name(self.label, "label")

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class UpstreamClipConfig:
    """Contrastive pretraining of ``model.name`` before the scenario, on captions naming every class of
    the synthetic dataset and images of a shifted distribution (docs/methods/cpe-clip.md): the offline
    stand-in for a web-scale CLIP. Deterministic, and cached by a digest of this recipe."""

    shift: float = 0.5  # 0 = the experiment's own image distribution, 1 = the strongest shift
    images_per_class: int = 100  # images per class of the shifted dataset
    captions_per_image: int = 4  # each from another caption template
    captions: Literal["class", "instance"] = "class"  # instance: captions describe each image (cross-modal retrieval)
    epochs: int = 30  # contrastive pretraining: AdamW with a one-cycle schedule
    batch_size: int = 100  # image-caption pairs per batch (class captions: same-class pairs are positives)
    lr: float = 2e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.1  # AdamW weight decay
    seed: int = 0  # the stage's own seed: one upstream CLIP serves every seed of the experiment

    def __post_init__(self):
        require(0 <= self.shift <= 1, "shift", "must be in [0, 1]")
        require(self.images_per_class >= 1, "images_per_class", "must be >= 1")
        require(1 <= self.captions_per_image <= 8, "captions_per_image", "must be in 1..8 (one per caption template)")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.batch_size >= 2, "batch_size", "must be >= 2 (contrastive pairs need negatives)")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")


@dataclass
class UpstreamConfig:
    """Replacement models trained "elsewhere", reproducibly: model k is each method's own network trained
    on the first ``classes[k]`` classes of ``data`` (another dataset, or another synthetic variant).
    Trained once per run and cached by a digest of this recipe."""

    data: DataConfig
    classes: list[int]  # model k trains on the first classes[k] classes of data
    training: dict[str, Any] = field(default_factory=dict)  # overrides of the experiment's training section
    seed: Optional[int] = None  # None: the experiment's seed; model k trains with seed + 1000·(k+1)

    def __post_init__(self):
        require(bool(self.classes) and all(c >= 1 for c in self.classes), "classes",
                "needs at least one model, each trained on >= 1 class")


@dataclass
class ExperimentConfig:
    """One experiment: one config file, one run directory."""

    # the run directory is <output_dir>/<name>: deterministic, so a re-run resumes; a safe name (letters,
    # digits, . _ -, starting with a letter or digit)
    name: str
    seed: int = 0  # drives class order, shot sampling, initialisation and batch order
    seeds: Optional[list[int]] = None  # several seeds: one run each in RUN_DIR/seed-N, metrics as mean ± std (replaces seed)
    output_dir: str = "runs"  # where the run goes (<output_dir>/<name>): a path, or s3://bucket/prefix, gs://bucket/prefix
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec(name="independent")])
    upstream_clip: Optional[UpstreamClipConfig] = None  # pretrain model.name offline before the scenario
    upstream: Optional[UpstreamConfig] = None  # replacement models trained elsewhere (scenario.replacements)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow / W&B / TensorBoard; not in the digest
    service: Optional[ServiceConfig] = None  # mixed-gallery and partial-backfill simulation over the versions

    def __post_init__(self):
        require(self.upstream_clip is None or (self.model.name is not None and self.model.pretrained is None),
                "upstream_clip", "pretrains model.name from random weights: set model.name and leave model.pretrained unset")
        require_name(self.name, "name")
        require(self.seeds is None or (bool(self.seeds) and len(set(self.seeds)) == len(self.seeds)), "seeds",
                f"must be a non-empty list of distinct seeds, got {self.seeds}")
        require(bool(self.methods), "methods", "needs at least one method")
        require(self.service is None or not self.evaluation.templates, "service",
                "ranks the mixed gallery item by item; class-mean templates (evaluation.templates) have no items")
        ranked = {self.evaluation.query, self.evaluation.gallery or self.evaluation.query}
        require(self.service is None or all(self.evaluation.sets[name].classes == "all" for name in ranked), "service",
                "needs every version to embed the same items: set classes: all on the query and gallery sets")
        keys = [m.key for m in self.methods]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        require(not dup, "methods", f"duplicate method label(s) {dup}; give each a distinct 'label'")

    def method_training(self, spec: MethodSpec, step: int = 0) -> TrainingConfig:
        """The training section with ``spec.training`` overrides applied and validated; steps after the
        first also apply its ``incremental`` overrides."""
        key = f"methods.{self.methods.index(spec)}.training"
        merged = {**to_dict(self.training), **spec.training}
        training = from_dict(TrainingConfig, merged, key)
        if step == 0 or not training.incremental:
            return training
        return from_dict(TrainingConfig, {**merged, **training.incremental, "incremental": {}}, f"{key}.incremental")

    def to_dict(self) -> dict:
        return to_dict(self)

    def digest(self) -> str:
        """Short hash of the resolved config (seed included) that names what a run directory holds."""
        return config_digest(self)

    def with_seed(self, seed: int) -> "ExperimentConfig":
        """This experiment with one seed: the config a run of that seed alone would have."""
        return dataclasses.replace(self, seed=seed, seeds=None)


# data keys that say how images reach the workers, never which (both loading paths give the same batches)
_DATA_DELIVERY_KEYS = ("loading", "memory_limit_gb", "decode_on")


def config_digest(cfg: Any) -> str:
    """Short hash of a typed config: the values that differ from the schema's defaults
    (:func:`~orchestrator.config.typed.explicit_dict`), without what never changes what a run computes:
    the ``tracking`` section, which observes it, and how its data is delivered (streamed or in memory,
    decoded where), so a resume may change them. A section or key added later at its default keeps every
    digest, and with it every run's identity and upstream cache location."""
    document = explicit_dict(cfg)
    document.pop("tracking", None)
    data_sections = [document.get("data")] + [s.get("data") for s in document.get("evaluation", {}).get("sets", {}).values()]
    for section in filter(None, data_sections):
        for key in _DATA_DELIVERY_KEYS:
            section.pop(key, None)
    blob = json.dumps(document, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to the raw config mapping. Replacing the
    whole ``methods`` list warns (:class:`ConfigWarning`) when the list it replaces had settings the new
    one drops (``methods.N.params.KEY=...`` changes one method and keeps the rest)."""
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key.path=value")
    path, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    if path.strip() == "methods":
        dropped = dropped_method_settings(data.get("methods"), value)
        if dropped:
            warnings.warn(ConfigWarning(
                f"--set methods=[...] replaces the config's method list and drops its settings: {'; '.join(dropped)}; "
                f"repeat them in the new list, or change one method with methods.N.params.KEY=VALUE"), stacklevel=2)
    set_key(data, path.strip(), value)


def dropped_method_settings(old: Any, new: Any) -> list[str]:
    """The entries of a raw ``methods`` list that carry settings (label, params, training) and are not in
    ``new`` as they are, each described as ``name (settings)``."""
    kept = new if isinstance(new, list) else []
    dropped = []
    for entry in old if isinstance(old, list) else []:
        settings = {k: v for k, v in entry.items() if k != "name" and v} if isinstance(entry, dict) else {}
        if settings and entry not in kept:
            dropped.append(f"{entry.get('name')} ({', '.join(f'{k}: {v}' for k, v in settings.items())})")
    return dropped


def set_key(data: dict, path: str, value: Any) -> None:
    """Set the entry at dotted ``path`` of a raw config mapping (list entries by index), creating
    missing sections; whether the key exists is left to validation, which names it."""
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(path, "empty component in key path")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(".".join(parts[: i + 1]), f"no list entry {part} (list has {len(node)} entries)")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        else:
            raise ConfigError(".".join(parts[:i]), f"is a value ({node!r}), not a section with keys")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(path, f"no list entry {last} (list has {len(node)} entries)")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(".".join(parts[:-1]), f"is a value ({node!r}), not a section with keys")


def resolve_config_path(config: str | None) -> Path:
    """A config argument is a file path or the name of a built-in config (e.g. ``quickstart``)."""
    name = config or "quickstart"
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (Path("configs") / f"{name}.yaml", BUILTIN_CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    builtins = sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError("", f"config file {name!r} not found; built-in configs: {', '.join(builtins)}")


def load_raw(config: str | None, overrides: list[str] = ()) -> dict:
    path = resolve_config_path(config)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must contain a mapping at the top level")
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def parse_config(data: dict) -> ExperimentConfig:
    """A raw mapping as typed sections: unknown keys, wrong types and impossible values within a section
    are errors here. Checks that need the datasets, the methods or the scenario (cross-section checks)
    are :func:`orchestrator.engine.validate.validate`'s, which every run performs before writing anything."""
    return from_dict(ExperimentConfig, data)


def load_config(config: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load and override an experiment config (``None`` = the built-in quickstart), as typed sections;
    ``orchestrator.load_config`` also performs the cross-section checks."""
    return parse_config(load_raw(config, overrides))
