"""The contract of cross-modal compatibility methods, and their registry.

Such a method makes queries of a *new* CLIP searchable in a gallery embedded by an *old* CLIP, in both
directions (new image vs old captions, new caption vs old images). It runs named stages, each one a Ray
Train step of the cross-modal driver, and then serves a :class:`ProjectedCLIP`: the new model (possibly
with adapters) followed by a map into the old space.

The engine knows two stage kinds and hands each its data:

- ``"text"``: :class:`TextPairs`, the new and the old model's embeddings of one caption corpus (the
  only contact with the old model, whose text embeddings were computed once, beforehand);
- ``"pairs"``: a :class:`PairData`: the new model (base weights) and batches of image-caption pairs;
  the old model is not available, not even loaded.

A stage returns the tensors to keep (its *state*); later stages and :meth:`query_encoder` receive the
state of every earlier stage. Training loops are the engine's (``StageContext.train``), so optimiser,
schedule, distribution and progress reporting are the same for every method.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import NoParams
from orchestrator.config.typed import from_dict
from orchestrator.config import TrainingConfig
from orchestrator.errors import ConfigError
from orchestrator.registry import Registry

State = dict[str, torch.Tensor]
# loss(module (DDP-wrapped when distributed), indices of this batch's items, epoch) -> (loss, named parts)
StageLoss = Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class TextPairs:
    """L2-normalised embeddings of the same captions, row for row: the new model's and the old model's."""

    new: torch.Tensor  # (N, d_new)
    old: torch.Tensor  # (N, d_old)


class PairData(Protocol):
    """Image-caption pairs for training the new model; ``len`` counts images."""

    clip: nn.Module  # the new model with its base weights, on the stage's device

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, tokens of one caption per image, drawn per epoch), on the device."""


@dataclass(frozen=True)
class StageContext:
    """What a stage is told: its name, seed, device, widths, recipe and the engine's training loop."""

    stage: str
    seed: int
    new_dim: int
    old_dim: int
    device: torch.device
    training: TrainingConfig
    train: Callable[[nn.Module, int, StageLoss], None]  # (module, number of items, loss) -> trains in place


class ProjectedCLIP(nn.Module):
    """Serves queries in the old space: new CLIP features, L2-normalised, mapped by ``projection`` and
    L2-normalised again. ``forward`` returns (image, text) features so DDP can wrap training."""

    def __init__(self, clip: nn.Module, projection: nn.Module):
        super().__init__()
        self.clip = clip
        self.projection = projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(F.normalize(self.clip.encode_image(images), dim=-1)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(F.normalize(self.clip.encode_text(tokens), dim=-1)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)


class CrossModalMethod(ABC):
    """Base class: name the stages, implement them, and build the served query encoder."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any):
        self.params = params

    @abstractmethod
    def stages(self) -> dict[str, Callable[[Any, State, StageContext], State]]:
        """Ordered stage name ("text" or "pairs") -> ``fit(data, state_so_far, ctx) -> state to keep``."""

    @abstractmethod
    def query_encoder(self, new_clip: nn.Module, state: State, new_dim: int, old_dim: int) -> ProjectedCLIP:
        """The served model, rebuilt from the new model (base weights) and the state of every stage."""

    def check_models(self, new_model: str, key: str) -> None:
        """Raise ConfigError (naming ``key``, the method's params) when the new model's architecture
        ``new_model`` does not fit this method; called by config validation, before anything is written."""

    def describe(self) -> dict[str, Any]:
        """Plain-data record of the choices this method ran with (stored in run metadata)."""
        return {"method": self.name, **dataclasses.asdict(self.params)}


STAGE_KINDS = ("text", "pairs")
def _load_builtin() -> None:
    import methods  # noqa: F401  (importing the package registers every built-in method)


CROSSMODAL_METHODS: Registry[type[CrossModalMethod]] = Registry("cross-modal method", "methods.name", load=_load_builtin)


def register_crossmodal(cls: type[CrossModalMethod]) -> type[CrossModalMethod]:
    """Class decorator: make a cross-modal method available by ``cls.name`` in configs."""
    return CROSSMODAL_METHODS.add(cls.name, cls)


def create_crossmodal(name: str, params: dict, key: str = "methods.0") -> CrossModalMethod:
    """Registry name + raw params -> a configured method; unknown names and bad params raise ConfigError."""
    cls = CROSSMODAL_METHODS.get(name, f"{key}.name")
    method = cls(from_dict(cls.Params, params, f"{key}.params"))
    unknown = sorted(set(method.stages()) - set(STAGE_KINDS))
    if unknown:
        raise TypeError(f"{cls.__qualname__} declares unknown stage kinds {unknown}; known: {STAGE_KINDS}")
    return method
