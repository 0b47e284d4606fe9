"""LoRA adapters on the attention and MLP linears of open_clip towers, never merged into the base.

Each adapted linear W gains a low-rank update W + (alpha / rank) · B A, with A (rank × in) initialised
like a linear layer and B (out × rank) at zero, so adding adapters leaves every output unchanged until
training moves B. The base tensors are frozen and never written to: the update is formed at forward
time, and with the adapters switched off (:func:`lora_disabled`) a wrapper calls its base module
directly, so the base model's outputs are bit-identical to the model before adaptation (new→new
retrieval keeps the untouched new model).

Targets (open_clip's names): ``q``, ``k``, ``v`` (slices of an attention in-projection), ``out_proj``
(attention output), ``c_fc`` and ``c_proj`` (the MLP). Towers: ``image`` (modules under ``visual``) and
``text`` (every other tower). Only open_clip's own transformer towers have these modules: a timm image
tower, a ModifiedResNet (RN50 …) or a Hugging Face text tower has none, and a requested tower that gets
no adapter is an error (:func:`check_towers` before a run, :func:`add_lora` when adapting), never a
silently unadapted tower.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import CheckpointError, ConfigError

ATTENTION_TARGETS = ("q", "k", "v", "out_proj")
MLP_TARGETS = ("c_fc", "c_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
TOWERS = ("image", "text")


class LowRankUpdate(nn.Module):
    """The trainable pair (A, B) of one adapted weight; ``delta()`` = scale · B A."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update applied to an input, without forming the full matrix."""
        return self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


class LoRALinear(nn.Module):
    """``base(x) + update(x)``; ``base`` is kept as it is, frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.update = LowRankUpdate(base.in_features, base.out_features, rank, alpha)
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:  # open_clip reads the MLP's weight dtype through this attribute
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.update(x) if self.enabled else out


class LoRAMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` whose q/k/v slices and output projection may carry low-rank updates."""

    def __init__(self, base: nn.MultiheadAttention, targets: Sequence[str], rank: int, alpha: float):
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise ConfigError("params.lora.targets", "attention with separate key/value widths is not supported")
        self.base = base
        dim = base.embed_dim
        self.updates = nn.ModuleDict({t: LowRankUpdate(dim, dim, rank, alpha) for t in targets})
        self.enabled = True

    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.enabled:
            return self.base(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                             attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        base, dim = self.base, self.base.embed_dim
        zero = base.in_proj_weight.new_zeros(dim, dim)
        in_proj = base.in_proj_weight + torch.cat([self.updates[t].delta() if t in self.updates else zero
                                                   for t in ("q", "k", "v")])
        out_proj = base.out_proj.weight + (self.updates["out_proj"].delta() if "out_proj" in self.updates else 0)
        if base.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, dim, base.num_heads, in_proj, base.in_proj_bias, base.bias_k, base.bias_v,
            base.add_zero_attn, base.dropout, out_proj, base.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if base.batch_first else out), weights


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = ("q", "v"),
             towers: Sequence[str] = TOWERS) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the targeted modules of ``towers`` in adapters, in place.

    Returns the names of the adapted modules; a request that adapts nothing is a config error.
    """
    if rank < 1:
        raise ConfigError("params.lora.rank", f"must be >= 1, got {rank}")
    for key, values, allowed in (("targets", targets, TARGETS), ("towers", towers, TOWERS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            raise ConfigError(f"params.lora.{key}", f"got {list(values)}; allowed values: {', '.join(allowed)}")
    for p in model.parameters():
        p.requires_grad_(False)
    attention = [t for t in ATTENTION_TARGETS if t in targets]
    adapted = []
    for name, module in list(model.named_modules()):
        tower = "image" if name.split(".")[0] == "visual" else "text"
        if tower not in towers:
            continue
        if attention and isinstance(module, nn.MultiheadAttention):
            wrapper: nn.Module = LoRAMultiheadAttention(module, attention, rank, alpha)
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and name.rsplit(".", 1)[-1] in MLP_TARGETS:
            wrapper = LoRALinear(module, rank, alpha)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        adapted.append(name)
    for tower in towers:
        if not any(("image" if name.split(".")[0] == "visual" else "text") == tower for name in adapted):
            kind = type(model.visual).__name__ if tower == "image" and hasattr(model, "visual") else "this text tower"
            raise ConfigError("params.lora.towers", (
                f"the {tower} tower ({kind}) has no module matching targets {list(targets)}, so it would get no "
                f"adapter; LoRA here adapts open_clip's own transformer towers (attention q/k/v/out_proj, MLP "
                f"c_fc/c_proj): remove {tower!r} from towers or choose other targets"))
    return adapted


def foreign_towers(config: dict) -> dict[str, str]:
    """The towers of an open_clip model config that are not open_clip's own transformers (so LoRA finds
    nothing to adapt in them), each with what it is instead."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    foreign = {}
    if vision.get("timm_model_name"):
        foreign["image"] = f"the timm model {vision['timm_model_name']!r}"
    elif isinstance(vision.get("layers"), (list, tuple)):
        foreign["image"] = "a ModifiedResNet"
    if text.get("hf_model_name"):
        foreign["text"] = f"the Hugging Face model {text['hf_model_name']!r}"
    return foreign


def check_towers(config: dict, model_name: str, towers: Sequence[str], key: str) -> None:
    """Before a run: refuse to adapt a tower of ``model_name`` that LoRA would leave without adapters."""
    foreign = foreign_towers(config)
    for tower in towers:
        if tower in foreign:
            raise ConfigError(key, f"the {tower} tower of {model_name} is {foreign[tower]}, which has no open_clip "
                                   f"attention or MLP modules to adapt; remove {tower!r} from towers")


def _wrappers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, (LoRALinear, LoRAMultiheadAttention)))


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the untouched base model inside the block (e.g. new→new embedding); adapters resume after."""
    wrappers = list(_wrappers(model))
    previous = [w.enabled for w in wrappers]
    for w in wrappers:
        w.enabled = False
    try:
        yield model
    finally:
        for w, flag in zip(wrappers, previous):
            w.enabled = flag


def lora_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter tensors only (a few KB-MB): the base model is rebuilt from its name and weights."""
    return {f"{prefix}{k}": v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in f".{k}"}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Load adapter tensors saved by :func:`lora_state_dict` into a model adapted the same way."""
    own = {k for k in model.state_dict() if ".lora_" in f".{k}"}
    if set(state) != own:
        missing, extra = sorted(own - set(state)), sorted(set(state) - own)
        raise CheckpointError(f"adapter checkpoint {source or ''} does not fit the adapted model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}); were rank/targets/towers changed?")
    model.load_state_dict(state, strict=False)
