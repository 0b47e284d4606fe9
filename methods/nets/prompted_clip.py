"""A frozen open_clip CLIP with CPE-CLIP's learnable prompts (docs/methods/cpe-clip.md), forward pass
re-implemented layer by layer over open_clip's own modules so prompts can be injected.

- One shared prompt tensor G (depth x L x text width), Xavier-uniform.
- Text tower ("replace"): G[0] is inserted right after the start token (the trailing L pad positions are
  dropped so the sequence still fits the positional table), positional embeddings are added over the
  lengthened sequence, and before each layer i < depth the prompt positions are overwritten with G[i].
  The end-of-text token, pooled after the final LayerNorm, sits L positions later than in the tokens.
- Vision tower: P = Linear(G) (one projection, text width -> vision width, shared by all layers).
  P[0] is appended after the patch tokens (no positional embedding) before the pre-LayerNorm; before
  each layer i < depth, ``accumulate`` appends P[i] and keeps every earlier prompt token's output
  (2, 4, ... prompt tokens), ``replace`` overwrites the prompt tokens with P[i], ``accumulate_same``
  re-appends the raw P[0..i]. The CLS token is pooled.
- With ``prompt_length == 0`` both towers reduce exactly to open_clip's ``encode_text``/``encode_image``
  (the zero-shot baseline).

Only G and the projection are trainable and only they are saved: the frozen CLIP is rebuilt from
``model.name``/``model.pretrained``, so a version checkpoint holds ~0.4 M numbers, not the whole CLIP.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import CheckpointError

VisionMode = Literal["accumulate", "replace", "accumulate_same"]
MASKED_LOGIT = -9999.0  # the reference's value for old-class logits in incremental sessions


def xavier_prompts(depth: int, length: int, width: int) -> torch.Tensor:
    """G (depth, length, width), Xavier-uniform on the 3-D tensor: fan_in = length*width,
    fan_out = depth*width, bound sqrt(6 / (fan_in + fan_out)) (±0.0289 for 12 x 2 x 512)."""
    return nn.init.xavier_uniform_(torch.empty(depth, length, width))


def insert_after_start(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """[start, prompts, x[1 : T-L]]: the prompts right after the start token; the sequence keeps its
    length T by dropping the last L positions (padding, checked by :func:`check_room_for_prompts`)."""
    length = prompts.shape[0]
    return torch.cat([x[:, :1], prompts.expand(len(x), -1, -1), x[:, 1:x.shape[1] - length]], dim=1)


def replace_after_start(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """x with positions 1..L overwritten by ``prompts`` (the text tower's per-layer replacement)."""
    length = prompts.shape[0]
    return torch.cat([x[:, :1], prompts.expand(len(x), -1, -1), x[:, 1 + length:]], dim=1)


def check_room_for_prompts(tokens: torch.Tensor, length: int) -> None:
    if length and tokens[:, tokens.shape[1] - length:].any():
        raise ValueError(f"a class prompt fills the last {length} of the {tokens.shape[1]} token positions, which "
                         f"the {length} prompt tokens need; shorten the template or the class name")


def pooled_positions(tokens: torch.Tensor, prompt_length: int, pool_type: str, eos_id: Optional[int]) -> torch.Tensor:
    """Index of the end-of-text token after insertion: open_clip's pooling index shifted by L."""
    if pool_type == "argmax":
        index = tokens.argmax(dim=-1)
    elif pool_type == "eos":
        index = (tokens == eos_id).int().argmax(dim=-1)
    else:
        raise CheckpointError(f"text pooling {pool_type!r} has no end-of-text token to shift; CLIP prompts need "
                              f"'argmax' or 'eos' pooling")
    return index + prompt_length


def extend_prompts(x: torch.Tensor, base_tokens: int, layer_prompts: torch.Tensor, all_prompts: torch.Tensor,
                   layer: int, mode: VisionMode) -> torch.Tensor:
    """Vision tokens before layer ``layer`` >= 1: CLS + patches (the first ``base_tokens``) and the
    prompt tokens per ``mode``."""
    batch = len(x)
    if mode == "accumulate":
        return torch.cat([x, layer_prompts.expand(batch, -1, -1)], dim=1)
    if mode == "replace":
        return torch.cat([x[:, :base_tokens], layer_prompts.expand(batch, -1, -1)], dim=1)
    raw = all_prompts[:layer + 1].reshape(-1, all_prompts.shape[-1])
    return torch.cat([x[:, :base_tokens], raw.expand(batch, -1, -1)], dim=1)


def _blocks(transformer: nn.Module, x: torch.Tensor, before_layer, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run open_clip residual blocks one by one (batch-first x), calling ``before_layer(i, x)`` first."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        x = before_layer(i, x)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


class PromptedClip(nn.Module):
    """A frozen CLIP, shared prompts G and the vision projection. ``forward(images)`` returns the image
    features, the text features of the classes set by :meth:`set_class_tokens`, and the logits
    ``logit_scale * cos``."""

    def __init__(self, clip: nn.Module, prompt_length: int, prompt_depth: int, vision_mode: Optional[VisionMode],
                 logit_scale: float):
        super().__init__()
        clip.requires_grad_(False)
        self.clip = clip.eval()
        self._check_architecture()
        self.prompt_length, self.prompt_depth = prompt_length, prompt_depth
        self.vision_mode = vision_mode if prompt_length else None
        self.logit_scale = logit_scale
        text_width = self.text.token_embedding.weight.shape[1]
        self.prompts = nn.Parameter(xavier_prompts(prompt_depth, prompt_length, text_width)) if prompt_length else None
        self.projection = nn.Linear(text_width, clip.visual.transformer.width) if self.vision_mode else None
        self.register_buffer("class_tokens", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        self.register_state_dict_post_hook(_drop_frozen_clip)
        self.register_load_state_dict_post_hook(_frozen_clip_is_not_missing)

    @property
    def text(self) -> nn.Module:
        """The module holding the text tower: the CLIP itself, or its ``.text`` (CustomTextCLIP)."""
        return self.clip.text if hasattr(self.clip, "text") else self.clip

    def _check_architecture(self) -> None:
        visual = self.clip.visual
        if not hasattr(visual, "class_embedding") or getattr(visual, "attn_pool", None) is not None:
            raise CheckpointError(f"prompts need a ViT image tower pooled on its class token; "
                                  f"{type(visual).__name__} is not one")
        if getattr(self.text, "cls_emb", None) is not None:
            raise CheckpointError("prompts need a causal text tower without a class token (CoCa-style towers are not supported)")

    def train(self, mode: bool = True) -> "PromptedClip":
        super().train(mode)
        self.clip.eval()  # frozen: no dropout, no patch dropout
        return self

    def set_class_tokens(self, tokens: torch.Tensor) -> None:
        """Tokenised class prompts (C, T) the logits are computed against."""
        check_room_for_prompts(tokens, self.prompt_length)
        self.class_tokens = tokens.to(self.class_tokens.device)

    # -- towers --------------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of (B, T) tokens with the prompts inserted."""
        text, length = self.text, self.prompt_length
        x = text.token_embedding(tokens)
        if length:
            x = insert_after_start(x, self.prompts[0])
        x = x + text.positional_embedding[:x.shape[1]]

        def before_layer(i: int, h: torch.Tensor) -> torch.Tensor:
            return replace_after_start(h, self.prompts[i]) if length and 0 < i < self.prompt_depth else h

        mask = text.attn_mask[:x.shape[1], :x.shape[1]] if text.attn_mask is not None else None
        x = text.ln_final(_blocks(text.transformer, x, before_layer, mask))
        pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        x = x[torch.arange(len(x), device=x.device), pooled_positions(tokens, length, pool_type, eos_id)]
        projection = text.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1)

    def vision_prompts(self) -> Optional[torch.Tensor]:
        """P = projection(G): (depth, L, vision width), or None without vision prompts."""
        return self.projection(self.prompts) if self.vision_mode else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of normalised (B, 3, H, W) images with the vision prompts."""
        visual = self.clip.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(len(x), -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        base_tokens = x.shape[1]
        prompts = self.vision_prompts()
        if prompts is not None:
            x = torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1)
        x = visual.ln_pre(x)

        def before_layer(i: int, h: torch.Tensor) -> torch.Tensor:
            if prompts is None or not 0 < i < self.prompt_depth:
                return h
            return extend_prompts(h, base_tokens, prompts[i], prompts, i, self.vision_mode)

        x = _blocks(visual.transformer, x, before_layer)
        pooled = visual.ln_post(x[:, 0])
        return F.normalize(pooled @ visual.proj if visual.proj is not None else pooled, dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.encode_image(images)
        text = self.encode_text(self.class_tokens)
        return {"feature": image, "text": text, "logits": self.logit_scale * image @ text.T}


def _drop_frozen_clip(module: PromptedClip, state_dict: dict, prefix: str, local_metadata) -> None:
    """Saved state: prompts and projection only; the frozen CLIP comes from the model section."""
    for key in [k for k in state_dict if k.startswith(prefix + "clip.")]:
        del state_dict[key]


def _frozen_clip_is_not_missing(module: PromptedClip, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if not (k.startswith("clip.") or ".clip." in k)]
