"""The Method contract and its registry.

A method decides how a model version is trained given earlier versions: which network it builds, what
one-off state it prepares (prototypes, a frozen old classifier, a replay memory), its loss, and which
feature it serves for retrieval. The orchestrator calls these hooks and never branches on a method's
name; a new method is one file that subclasses :class:`Method` and decorates it with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar, Iterable, Literal, Optional, Union

import torch
from torch import nn

from orchestrator.config.typed import from_dict
from orchestrator.config import ModelConfig, TrainingConfig
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.registry import Registry


@dataclass(frozen=True)
class StoredWeights:
    """Weights the engine keeps in the run's storage, handed to a method as something it can load.

    A run may live on a filesystem that is no local directory tree (an object store), so earlier
    versions and upstream models come as a name (where they are, for messages and records) and a
    function that returns their bytes: a ``torch.save`` of tensors, or safetensors when the name ends in
    ``.safetensors``. :func:`load_state_dict` reads them like a local file, with the same safety rules."""

    name: str
    read: Callable[[], bytes] = field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.name


# What a method loads weights from: stored in the run (StoredWeights), or a user's file or directory.
Weights = Union[StoredWeights, str, Path]


@dataclass(frozen=True)
class StepContext:
    """What a method is told about the step it trains. Labels are class positions 0..n-1 in class order."""

    index: int  # the version this step produces
    num_steps: int
    num_seen: int  # classes known after this step: labels 0..num_seen-1
    num_previous: int  # classes known before this step: labels 0..num_previous-1
    event: str  # train | finetune | replace
    model: ModelConfig
    training: TrainingConfig
    seed: int
    shots: Optional[int] = None
    previous_checkpoint: Optional[Weights] = None  # version index-1
    init_checkpoint: Optional[Weights] = None  # model to start from (finetune: previous version; replace: replacement)
    device: str = "cpu"
    world_size: int = 1
    rank: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # scenario facts a method may read (e.g. upstream paths)
    # this method's finished version k of the run, frozen, on the device (set by the engine)
    load_version: Optional[Callable[[int], nn.Module]] = None

    @property
    def new_classes(self) -> range:
        return range(self.num_previous, self.num_seen)

    @property
    def is_first(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class InputSpec:
    """Square input size, per-channel normalisation (in [0, 1] units) and resize filter a network expects
    (a pretrained CLIP's own preprocessing resizes bicubically, or as its pretrained configuration says)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"


@dataclass
class NoParams:
    """Methods without hyperparameters."""


class Method(ABC):
    """Base class: override the hooks your method needs; defaults give plain cross-entropy training."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_previous: ClassVar[bool] = False  # load version index-1 (frozen) before training?
    reference_label_smoothing: ClassVar[float] = 0.0  # the reference's ε, used when training.label_smoothing is unset
    # The model-section keys this method's network reads (None: all of them). A key set to other than its
    # default that no method of an experiment reads is a config error: it would silently do nothing.
    model_keys: ClassVar[Optional[frozenset[str]]] = None

    def __init__(self, params: Any, model_cfg: ModelConfig):
        self.params = params
        self.model_cfg = model_cfg

    # -- model ---------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, ctx: StepContext) -> nn.Module:
        """A freshly initialised network for ``ctx`` (classifier sized for ``ctx.num_seen``)."""

    def init_model(self, ctx: StepContext) -> nn.Module:
        """The network training starts from: fresh, or ``ctx.init_checkpoint`` loaded into it. A
        replacement model was trained elsewhere on other classes, so its classifier tensors (under
        :meth:`growable_prefixes`) are re-initialised rather than loaded."""
        torch.manual_seed(ctx.seed * 1000 + ctx.index)
        model = self.build_model(ctx)
        if ctx.init_checkpoint:
            fresh = self.growable_prefixes() if ctx.event == "replace" else ()
            self.load_weights(model, ctx.init_checkpoint, strict=False, keep_fresh=fresh)
        return model

    def load_version(self, ctx: StepContext, checkpoint: Weights, strict: bool = True) -> nn.Module:
        """Load a finished version (built for its own ``ctx``), frozen and in eval mode; ``strict=False``
        loads a model from elsewhere (e.g. a replacement) into the network of ``ctx``."""
        model = self.build_model(ctx)
        self.load_weights(model, checkpoint, strict=strict)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def load_weights(self, model: nn.Module, checkpoint: Weights, strict: bool, keep_fresh: tuple[str, ...] = ()) -> None:
        """Load a state dict safely; with ``strict=False`` tensors whose shapes differ (e.g. a grown
        classifier) are kept from the fresh model and the first rows are copied over, and tensors under
        the ``keep_fresh`` prefixes are not loaded at all."""
        state = load_state_dict(checkpoint)
        own = model.state_dict()
        if strict:
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint {checkpoint} does not fit {self.name}'s model: {exc}") from None
            return
        missing = [k for k in own if k not in state]
        backbone_missing = [k for k in missing if not k.startswith(self.growable_prefixes())]
        if own and len(backbone_missing) == len(own):  # a model without saved state has nothing to share
            raise CheckpointError(f"checkpoint {checkpoint} shares no parameter names with {self.name}'s model")
        merged = dict(own)
        for key, value in state.items():
            if key not in own or key.startswith(keep_fresh):
                continue
            target = own[key]
            if value.shape == target.shape:
                merged[key] = value
            elif key.startswith(self.growable_prefixes()) and value.dim() == target.dim() and all(
                s <= t for s, t in zip(value.shape, target.shape)
            ):
                grown = target.clone()
                grown[tuple(slice(0, s) for s in value.shape)] = value
                merged[key] = grown
            else:
                raise CheckpointError(
                    f"checkpoint {checkpoint}: tensor {key!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
        model.load_state_dict(merged)

    def growable_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes whose tensors may grow between versions (classifiers)."""
        return ("classifier.",)

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def check_model(self, key: str) -> None:
        """Raise ConfigError (naming ``key``, the model section) when ``self.model_cfg`` does not fit this
        method; called by config validation, before anything is written."""

    def check_params(self, key: str) -> None:
        """Raise ConfigError (naming a key under ``key``, the method's params) when the params do not fit
        the model section (e.g. too few pairs for the embedding width); called by config validation."""

    def input_spec(self) -> Optional["InputSpec"]:
        """The input size and normalisation this method's network needs (e.g. a pretrained CLIP's), or
        ``None`` for the data section's own transform."""
        return None

    def first_version_recipe(self) -> Optional[str]:
        """A name shared by methods whose version 0 is the very same model (same network, loss, data and
        seeding, given the same config): an experiment trains it once and copies it to the others
        (``resources.share_first_version``). ``None``, the default, never shares."""
        return None

    def weights_from(self) -> Optional[str]:
        """The label of an earlier method of the experiment whose version k is this method's version k
        before :meth:`after_training` (a training-free method on top of trained ones): the engine loads its
        weights and trains nothing. ``None``, the default, trains."""
        return None

    def upgrades_stored_vectors(self) -> bool:
        """Whether :meth:`after_training` returns a map that upgrades older versions' stored vectors (which
        an approximate index of the stored vectors cannot serve: validation refuses the two together)."""
        return False

    def anchor_checkpoint(self, ctx: StepContext) -> Optional[Union[int, Weights]]:
        """The model :meth:`prepare` receives, frozen, as ``previous`` (when ``needs_previous``): an int
        is one of this method's own earlier versions (the engine loads it, as ``ctx.load_version`` does),
        other weights a model from elsewhere (``ctx.init_checkpoint``, e.g. a replacement). The previous
        version by default."""
        return ctx.index - 1 if ctx.index > 0 else None

    @classmethod
    def upstream_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters of this method's models trained elsewhere (the upstream stage that produces
        replacement models); the same as the scenario's by default."""
        return params

    # -- training ------------------------------------------------------------------------------
    def prepare(self, ctx: StepContext, model: nn.Module, previous: Optional[nn.Module], loader) -> dict:
        """One-off state before training (prototypes, frozen heads). ``loader`` yields (images, labels)
        batches of this step's training data with the transform :meth:`prepare_transform` names."""
        return {}

    def prepare_transform(self) -> Literal["test", "train"]:
        """Transform of the ``loader`` handed to :meth:`prepare`: the test-time one, or the training
        augmentation (the OCA reference code builds its prototypes under it)."""
        return "test"

    @abstractmethod
    def loss(self, outputs: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, state: dict,
             ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss plus named parts for logging. ``outputs`` is ``model(images)`` computed by the
        engine (through DDP when distributed), so methods never call the wrapped model themselves."""

    def label_smoothing(self, ctx: StepContext) -> float:
        """ε of this step's cross-entropies: ``training.label_smoothing``, or the method's reference value
        (:attr:`reference_label_smoothing`) when the config leaves it unset."""
        value = ctx.training.label_smoothing
        return self.reference_label_smoothing if value is None else value

    def after_backward(self, model: nn.Module, state: dict, ctx: StepContext) -> None:
        """Hook between ``backward()`` and ``optimizer.step()`` (e.g. gradient scaling)."""

    def after_training(self, ctx: StepContext, model: nn.Module, previous: Optional[nn.Module],
                       loader) -> Optional[dict[str, torch.Tensor]]:
        """Hook after training, before the version embeds anything (e.g. fit a training-free adapter on
        ``loader``'s images, unaugmented). May return the tensors of a map that upgrades the vectors a
        gallery stores from version ``index-1`` into this version's space (consumed by
        :func:`methods.alignment.apply_map`; the protocol applies it to every older gallery); None, the
        default, serves stored vectors as they are."""
        return None

    # -- serving -------------------------------------------------------------------------------
    @abstractmethod
    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The L2-normalised feature this version serves for retrieval."""

    def classify(self, model: nn.Module, images: torch.Tensor, ctx: StepContext) -> Optional[torch.Tensor]:
        """Logits over ``ctx.num_seen`` classes for accuracy reporting; ``None`` if not a classifier."""
        return None

    def describe(self) -> dict[str, Any]:
        """Plain-data record of the choices this method ran with (stored in run metadata)."""
        return {"method": self.name, **dataclasses.asdict(self.params),
                "reference_label_smoothing": self.reference_label_smoothing}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by ``cls.name`` in configs."""
    return METHODS.add(cls.name, cls)


EXTRA_METHOD_MODULES_ENV = "COMPAT_EXTRA_METHOD_MODULES"


def _load_builtin_methods() -> None:
    """Register the built-in methods, then those of the modules named (comma-separated) in the
    ``COMPAT_EXTRA_METHOD_MODULES`` environment variable. Ray workers resolve a method by name in their
    own process, so a method living outside this package must be registered there too: set the variable
    (and make the module importable, e.g. PYTHONPATH or a ``working_dir``) in the job's runtime_env."""
    import importlib
    import os

    import methods  # noqa: F401  (importing the package registers every built-in method)

    for module in filter(None, (m.strip() for m in os.environ.get(EXTRA_METHOD_MODULES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError("", f"{EXTRA_METHOD_MODULES_ENV} names module {module!r}, which cannot be imported "
                                  f"({exc}); put it on PYTHONPATH or remove it from the variable") from exc


METHODS: Registry[type[Method]] = Registry("method", "methods.name", load=_load_builtin_methods)


def list_methods() -> list[str]:
    return METHODS.names()


def method_class(name: str, key: str = "methods.name") -> type[Method]:
    return METHODS.get(name, key)


def parse_params(name: str, params: dict, key: str) -> Any:
    """Validate a method's ``params`` mapping against its ``Params`` dataclass."""
    return from_dict(method_class(name).Params, params, key)


def create_method(name: str, params: dict, model_cfg: ModelConfig, key: str = "methods") -> Method:
    """The one factory: registry name + raw params -> a configured method."""
    cls = method_class(name, f"{key}.name")
    return cls(parse_params(name, params, f"{key}.params"), model_cfg)


def load_state_dict(checkpoint: Weights) -> dict[str, torch.Tensor]:
    """Read model weights safely: ``.safetensors`` or ``torch.load(weights_only=True)``, never pickled code.
    ``checkpoint`` is weights stored in the run (:class:`StoredWeights`), a file, or a directory holding
    ``model.safetensors`` or ``model.pt``."""
    if isinstance(checkpoint, StoredWeights):
        where, safetensors = checkpoint.name, PurePosixPath(checkpoint.name).suffix == ".safetensors"
        try:
            data = checkpoint.read()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {where} does not exist") from None
    else:
        path = checkpoint_file(checkpoint)
        where, safetensors, data = path, path.suffix == ".safetensors", None
    try:
        if safetensors:
            from safetensors.torch import load, load_file

            state = load(data) if data is not None else load_file(str(where))
        else:
            state = torch.load(io.BytesIO(data) if data is not None else where, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects, truncated download ...
        raise CheckpointError(f"checkpoint {where} cannot be loaded safely ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {where} is not a state dict of tensors")
    return state


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The local weights file a checkpoint names: the path itself, or a version directory's
    ``model.safetensors`` or ``model.pt``."""
    path = Path(checkpoint)
    if path.is_dir():
        for name in ("model.safetensors", "model.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"checkpoint directory {path} holds neither model.safetensors nor model.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
