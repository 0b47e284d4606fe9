"""``xbt``: cross-modal backward-compatible training (docs/methods/xbt.md, a reconstruction).

Stage ``text`` (text only): a projection φ from the new embedding space to the old one is trained so
that φ(f_new(t) + ε), ε ~ N(0, σ²I), matches f_old(t) for the captions t of a corpus; the noise stands
in for the image-text gap, so φ also transfers to image embeddings it never sees here.

Stage ``pairs`` (image-caption pairs, the old model not run): LoRA adapters on the new towers are
trained with φ so that φ(new image) and φ(new caption) align in the old space (symmetric InfoNCE),
plus an optional consistency term keeping φ(new caption) near the stage-1 output for that caption.

Serving: base new model + adapters -> φ -> L2 normalisation searches the old gallery; new-new
retrieval uses the base model with the adapters off (the base weights are never changed).

Every unknown of the paper is a parameter with a documented default (docs/methods/xbt.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.crossmodal_base import (CrossModalMethod, PairData, ProjectedCLIP, StageContext, State, TextPairs,
                                     register_crossmodal)
from methods.nets.lora import TARGETS, TOWERS, add_lora, check_towers, load_lora_state_dict, lora_disabled, lora_state_dict
from orchestrator.config.typed import require

TextLoss = Literal["infonce", "cosine", "mse"]


@dataclass
class LoRAParams:
    """Adapters of stage 2 (defaults: rank 8 on the attention q/v of both towers)."""

    rank: int = 8  # rank of each low-rank update
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # q, k, v, out_proj (attention); c_fc, c_proj (MLP)
    # towers that get adapters; each must be one of open_clip's own transformer towers (a timm or
    # ModifiedResNet image tower, or a Hugging Face text tower, has nothing to adapt: a config error)
    towers: list[str] = field(default_factory=lambda: ["image", "text"])

    def __post_init__(self):
        require(self.rank >= 1, "rank", "must be >= 1")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(bool(self.targets) and set(self.targets) <= set(TARGETS), "targets",
                f"got {self.targets}; allowed values: {', '.join(TARGETS)}")
        require(bool(self.towers) and set(self.towers) <= set(TOWERS), "towers",
                f"got {self.towers}; allowed values: {', '.join(TOWERS)}")


@dataclass
class XBTParams:
    """The paper's unknowns, each a choice recorded in the run metadata."""

    projection: Literal["linear", "mlp", "mlp_residual"] = "mlp_residual"  # φ: linear, GELU MLP, MLP + linear skip
    hidden: Optional[int] = None  # width of the MLP's hidden layer (unset: 2048); mlp and mlp_residual only
    normalize_output: bool = True  # stage-1 losses see L2-normalised φ outputs (serving always normalises)
    noise_sigma: float = 0.05  # per-coordinate std of the stage-1 noise, added to unit-norm embeddings
    text_loss: list[TextLoss] = field(default_factory=lambda: ["infonce", "cosine"])  # summed
    temperature: float = 0.07  # InfoNCE temperature of both stages
    learn_temperature: bool = False  # train the InfoNCE temperature
    text_stage: bool = True  # False: the "no stage 1" ablation (φ starts from its initialisation)
    pair_stage: bool = True  # False: serve φ after stage 1, without adapters
    # stage 2: weight of 1 - cos(φ(new caption), stage-1 output) (unset: 1); needs both stages
    consistency_weight: Optional[float] = None
    # Stage 2: whether φ keeps training alongside the adapters. A trainable φ is the natural first
    # reading of the paper; φ is frozen by default so a few hundred pairs cannot pull it away from the old
    # space it learnt on the larger text corpus (on the synthetic runs the two are on par, docs/results/xbt.md).
    # Without stage 1 φ always trains.
    train_projection: bool = False
    lora: LoRAParams = field(default_factory=LoRAParams)

    def __post_init__(self):
        require(self.hidden is None or self.hidden >= 1, "hidden", "must be >= 1")
        require(self.hidden is None or self.projection != "linear", "hidden",
                "does nothing with projection 'linear' (no hidden layer); remove it or choose mlp / mlp_residual")
        require(self.noise_sigma >= 0, "noise_sigma", "must be >= 0")
        require(bool(self.text_loss) and len(set(self.text_loss)) == len(self.text_loss), "text_loss",
                "needs one or more distinct losses of: infonce, cosine, mse")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.text_stage or self.pair_stage, "pair_stage", "at least one of text_stage and pair_stage must run")
        require(self.consistency_weight is None or self.consistency_weight >= 0, "consistency_weight", "must be >= 0")
        require(self.consistency_weight is None or (self.text_stage and self.pair_stage), "consistency_weight",
                "keeps stage 2's caption outputs near stage 1's, so it needs text_stage and pair_stage; remove it")

    @property
    def resolved_hidden(self) -> int:
        return 2048 if self.hidden is None else self.hidden

    @property
    def resolved_consistency_weight(self) -> float:
        """The consistency term's weight: 0 unless both stages run, then 1 unless configured."""
        if not (self.text_stage and self.pair_stage):
            return 0.0
        return 1.0 if self.consistency_weight is None else self.consistency_weight


class Projection(nn.Module):
    """φ: d_new -> d_old as a linear map, a 2-layer GELU MLP, or an MLP plus a linear skip."""

    def __init__(self, new_dim: int, old_dim: int, kind: str, hidden: int):
        super().__init__()
        self.linear = nn.Linear(new_dim, old_dim) if kind in ("linear", "mlp_residual") else None
        self.mlp = (nn.Sequential(nn.Linear(new_dim, hidden), nn.GELU(), nn.Linear(hidden, old_dim))
                    if kind in ("mlp", "mlp_residual") else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [branch(x) for branch in (self.linear, self.mlp) if branch is not None]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the a->b and b->a cross-entropies of scaled cosine logits; row i of a matches row i of b."""
    logits = logit_scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def text_alignment_losses(predicted: torch.Tensor, target: torch.Tensor, losses: list[str],
                          logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage-1 losses between φ's outputs and the old text embeddings (summed by the caller)."""
    table = {
        "infonce": lambda: symmetric_infonce(predicted, target, logit_scale),
        "cosine": lambda: (1 - F.cosine_similarity(predicted, target, dim=-1)).mean(),
        "mse": lambda: (predicted - target).pow(2).sum(-1).mean(),
    }
    return {name: table[name]() for name in losses}


class _LogitScale(nn.Module):
    """log(1/temperature), trainable or fixed."""

    def __init__(self, temperature: float, learn: bool):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()


class _TextStage(nn.Module):
    def __init__(self, projection: Projection, scale: _LogitScale):
        super().__init__()
        self.projection, self.scale = projection, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class _PairStage(nn.Module):
    def __init__(self, encoder: ProjectedCLIP, scale: _LogitScale):
        super().__init__()
        self.encoder, self.scale = encoder, scale

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images, tokens)


@register_crossmodal
class XBT(CrossModalMethod):
    """Text-only projection pretraining, then LoRA + projection on image-caption pairs."""

    name = "xbt"
    Params = XBTParams

    def stages(self):
        return {name: fit for name, fit, on in (("text", self.fit_text, self.params.text_stage),
                                                ("pairs", self.fit_pairs, self.params.pair_stage)) if on}

    def check_models(self, new_model: str, key: str) -> None:
        from methods.nets.clip_models import model_config

        if self.params.pair_stage:
            check_towers(model_config(new_model), new_model, self.params.lora.towers, f"{key}.lora.towers")

    def projection(self, new_dim: int, old_dim: int, state: State) -> Projection:
        phi = Projection(new_dim, old_dim, self.params.projection, self.params.resolved_hidden)
        own = {k.removeprefix("projection."): v for k, v in state.items() if k.startswith("projection.")}
        if own:
            phi.load_state_dict(own)
        return phi

    def fit_text(self, pairs: TextPairs, state: State, ctx: StageContext) -> State:
        torch.manual_seed(ctx.seed)
        stage = _TextStage(self.projection(ctx.new_dim, ctx.old_dim, {}),
                           _LogitScale(self.params.temperature, self.params.learn_temperature)).to(ctx.device)
        noise = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 1)
        sigma = self.params.noise_sigma

        def loss(module: nn.Module, idx: torch.Tensor, epoch: int):
            x = pairs.new[idx]
            noisy = x + sigma * torch.randn(x.shape, generator=noise, device=x.device) if sigma else x
            predicted = F.normalize(module(noisy), dim=-1) if self.params.normalize_output else module(noisy)
            parts = text_alignment_losses(predicted, pairs.old[idx], self.params.text_loss, stage.scale())
            return sum(parts.values()), parts

        ctx.train(stage, len(pairs.new), loss)
        return {f"projection.{k}": v.detach().cpu() for k, v in stage.projection.state_dict().items()}

    def fit_pairs(self, data: PairData, state: State, ctx: StageContext) -> State:
        torch.manual_seed(ctx.seed + 2)
        phi = self.projection(ctx.new_dim, ctx.old_dim, state).to(ctx.device)
        anchor = copy.deepcopy(phi).requires_grad_(False) if any(k.startswith("projection.") for k in state) else None
        add_lora(data.clip, self.params.lora.rank, self.params.lora.alpha, self.params.lora.targets,
                 self.params.lora.towers)
        data.clip.to(ctx.device)
        phi.requires_grad_(self.params.train_projection or anchor is None)  # without stage 1, φ has to learn here
        stage = _PairStage(ProjectedCLIP(data.clip, phi),
                           _LogitScale(self.params.temperature, self.params.learn_temperature)).to(ctx.device)
        weight = self.params.resolved_consistency_weight  # 0 without stage 1 (no anchor)

        def loss(module: nn.Module, idx: torch.Tensor, epoch: int):
            images, tokens = data.batch(idx, epoch)
            image_out, text_out = module(images, tokens)
            parts = {"contrastive": symmetric_infonce(image_out, text_out, stage.scale())}
            if weight:
                with torch.no_grad(), lora_disabled(data.clip):
                    target = anchor(F.normalize(data.clip.encode_text(tokens), dim=-1))
                parts["consistency"] = (1 - F.cosine_similarity(text_out, target, dim=-1)).mean()
            return parts["contrastive"] + weight * parts.get("consistency", 0.0), parts

        ctx.train(stage, len(data), loss)
        saved = {f"projection.{k}": v.detach().cpu() for k, v in phi.state_dict().items()}
        return {**saved, **lora_state_dict(data.clip, prefix="lora.")}

    def describe(self) -> dict:
        return {**super().describe(), "hidden": None if self.params.projection == "linear" else self.params.resolved_hidden,
                "consistency_weight": self.params.resolved_consistency_weight}

    def query_encoder(self, new_clip: nn.Module, state: State, new_dim: int, old_dim: int) -> ProjectedCLIP:
        adapters = {k.removeprefix("lora."): v for k, v in state.items() if k.startswith("lora.")}
        if adapters:
            add_lora(new_clip, self.params.lora.rank, self.params.lora.alpha, self.params.lora.targets,
                     self.params.lora.towers)
            load_lora_state_dict(new_clip, adapters)
        return ProjectedCLIP(new_clip, self.projection(new_dim, old_dim, state)).eval()
