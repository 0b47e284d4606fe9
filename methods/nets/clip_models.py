"""open_clip models by ``(name, pretrained)``, plus the tiny architectures shipped for offline runs.

API (stable; shared by the CLIP methods and the upstream CLIP stage):

- ``create_clip(name, pretrained=None) -> (model, tokenizer)``: an open_clip model in eval mode.
  ``name`` is any open_clip architecture (``open_clip.list_models()``) or a shipped tiny one
  (:data:`TINY_MODELS`); ``pretrained`` is ``None`` (random weights), an open_clip tag such as
  ``"openai"`` (open_clip fetches it; offline this raises one :class:`CheckpointError` saying how to pass a
  local file instead) or a local state-dict file (``.pt``/``.bin``/``.safetensors``, read with
  ``weights_only``).
- ``create_frozen_clip(name, pretrained=None)``: the same for a model that stays frozen: random weights
  come from one fixed seed, so every session of a run sees the same network.
- ``check_clip_spec(name, pretrained, key)``: the same choices validated without building anything
  (raises :class:`ConfigError` naming ``key``), including the activation trap: weights trained with
  QuickGELU (OpenAI's, and a few others) load without error into an architecture with exact GELU and
  give silently wrong features, so that pairing is refused with the ``-quickgelu`` name to use.
- ``clip_input_spec(name, pretrained=None) -> InputSpec``: the image size, normalisation and resize
  filter the weights expect (the pretrained tag's preprocessing, see :func:`preprocess_config`).
- ``encode_images(model, images)`` / ``encode_texts(model, tokenizer, texts)``: L2-normalised features.
- ``embedding_dim(name)``, ``text_width(name)``, ``vision_width(name)``, ``num_text_layers(name)``.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import InputSpec, load_state_dict
from orchestrator.errors import CheckpointError, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def _open_clip():
    """open_clip with the shipped tiny configs registered (once)."""
    import open_clip

    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def model_config(name: str, key: str = "model.name") -> dict:
    config = _open_clip().get_model_config(name)
    if config is None:
        raise ConfigError(key, f"unknown open_clip model {name!r}; shipped tiny models: {', '.join(TINY_MODELS)}; "
                               f"others: see open_clip.list_models()")
    return config


def embedding_dim(name: str) -> int:
    return int(model_config(name)["embed_dim"])


def text_width(name: str) -> int:
    return int(model_config(name)["text_cfg"]["width"])


def vision_width(name: str) -> int:
    return int(model_config(name)["vision_cfg"]["width"])


def num_text_layers(name: str) -> int:
    return int(model_config(name)["text_cfg"]["layers"])


def uses_quick_gelu(name: str) -> bool:
    """Whether the architecture ``name`` builds QuickGELU (x·σ(1.702x)) rather than exact GELU layers."""
    return bool(model_config(name).get("quick_gelu", False))


def _quick_gelu_advice(name: str) -> str:
    twin = f"{name}-quickgelu"
    if twin in _open_clip().list_models():
        return f"name the architecture {twin!r} (same layers, QuickGELU)"
    return "use an architecture whose open_clip config sets quick_gelu: true"


# Keys of a state dict taken from OpenAI's own CLIP release (the TorchScript model's attributes).
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released ``.pt`` files are TorchScript archives (code + weights), not state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in archive.namelist())


def _checkpoint_keys(path: Path) -> set[str]:
    """The tensor names of a state-dict file, read without loading the tensors where the format allows;
    empty when the file cannot be read (loading it later reports why)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return set(f.keys())
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return set()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return set(state) if isinstance(state, dict) else set()


def openai_weights_evidence(path: Path, keys: set[str]) -> Optional[str]:
    """Why a local weights file is recognisably OpenAI's CLIP, or ``None``: the keys only OpenAI's release
    has, or "openai" in the file's name or its three parent directories (how open_clip's Hugging Face
    cache names those weights, e.g. ``models--timm--vit_base_patch16_clip_224.openai``)."""
    if keys & set(OPENAI_ONLY_KEYS):
        return f"holds OpenAI's own state-dict keys ({', '.join(sorted(keys & set(OPENAI_ONLY_KEYS)))})"
    named = [part for part in path.parts[-4:] if re.search("openai", part, re.IGNORECASE)]
    if named:
        return f"is named as OpenAI's weights ({named[-1]!r})"
    return None


def check_clip_spec(name: str, pretrained: Optional[str], key: str = "model") -> None:
    """Validate ``(name, pretrained)`` before anything runs: a known architecture, a known tag or an
    existing file, and weights whose activation (QuickGELU or GELU) is the architecture's."""
    model_config(name, f"{key}.name")
    if pretrained is None:
        return
    path = Path(pretrained).expanduser()
    if path.is_file():
        if _is_torchscript_archive(path):
            raise ConfigError(f"{key}.pretrained", (
                f"{pretrained} is a TorchScript archive (OpenAI's own release format), which is not loaded here "
                f"(it runs code); use the open_clip tag 'openai' with a -quickgelu architecture, or convert it once: "
                f"open_clip.create_model('{name}-quickgelu', pretrained=PATH) and save its state_dict()"))
        evidence = openai_weights_evidence(path, _checkpoint_keys(path))
        if evidence and not uses_quick_gelu(name):
            raise ConfigError(f"{key}.name", (
                f"{pretrained} {evidence}: OpenAI's CLIP weights were trained with QuickGELU, but {name!r} builds "
                f"exact GELU layers, so the weights would load without error and every feature would be wrong; "
                f"{_quick_gelu_advice(name)}"))
        return
    tags = _open_clip().list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        looks_like_path = "/" in pretrained or Path(pretrained).suffix in (".pt", ".bin", ".pth", ".safetensors")
        reason = (f"file {pretrained!r} does not exist" if looks_like_path
                  else f"{pretrained!r} is not an open_clip tag of {name!r} (tags: {', '.join(tags) or 'none'})")
        raise ConfigError(f"{key}.pretrained", f"{reason}; pass an open_clip tag or a local checkpoint file")
    trained_quick = bool(_open_clip().get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    if trained_quick != uses_quick_gelu(name):
        advice = (_quick_gelu_advice(name) if trained_quick
                  else f"name the architecture {name.removesuffix('-quickgelu')!r} (exact GELU)")
        raise ConfigError(f"{key}.name", (
            f"the open_clip weights {name}/{pretrained} were trained with {'QuickGELU' if trained_quick else 'GELU'}, "
            f"but {name!r} builds {'GELU' if trained_quick else 'QuickGELU'} layers (open_clip only warns and every "
            f"feature would be wrong); {advice}"))


def preprocess_config(name: str, pretrained: Optional[str] = None) -> dict:
    """The image preprocessing the weights ``(name, pretrained)`` were trained with, resolved as open_clip
    does: its defaults (OpenAI's mean/std, bicubic), then the architecture's ``preprocess_cfg``, then the
    pretrained tag's configuration (e.g. SigLIP's 0.5 mean/std). For a local file or random weights there
    is no tag: the configuration every tag of the architecture shares is used when they all agree."""
    open_clip = _open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = merge_preprocess_dict(PreprocessCfg(), model_config(name).get("preprocess_cfg") or {})
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        overlay = open_clip.get_pretrained_cfg(name, pretrained)
    else:
        candidates = [merge_preprocess_dict({}, open_clip.get_pretrained_cfg(name, tag)) for tag in tags]
        overlay = candidates[0] if candidates and all(c == candidates[0] for c in candidates) else {}
    return merge_preprocess_dict(config, overlay)


def clip_input_spec(name: str, pretrained: Optional[str] = None) -> InputSpec:
    """Input size from the architecture; mean, std and resize filter from :func:`preprocess_config`."""
    config = model_config(name)
    size = config["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    pre = preprocess_config(name, pretrained)
    if pre["interpolation"] not in ("bilinear", "bicubic"):
        raise ConfigError("model.pretrained", f"the weights {name}/{pretrained} expect {pre['interpolation']!r} "
                                              f"resizing, which is not supported (bilinear, bicubic)")
    return InputSpec(int(size), tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"])


_RANDOM_INIT_MESSAGE = "No pretrained weights loaded"  # open_clip's warning when it initialises randomly
_warned_random: set[str] = set()  # architectures whose random initialisation this process has warned about


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RANDOM_INIT_MESSAGE)


def create_clip(name: str, pretrained: Optional[str] = None) -> tuple[nn.Module, Tokenizer]:
    """The open_clip model ``name`` with weights from ``pretrained`` (see module docstring), in eval mode,
    and its tokenizer. open_clip's warning that a model is randomly initialised is shown once per
    architecture and process (and never for a local file, whose weights are loaded right after)."""
    open_clip = _open_clip()
    check_clip_spec(name, pretrained)
    local = pretrained is not None and Path(pretrained).expanduser().is_file()
    if pretrained is None or local:
        quiet = local or name in _warned_random
        if not local:
            _warned_random.add(name)
        drop = _DropRandomInitWarning()
        if quiet:
            logging.getLogger().addFilter(drop)
        try:
            model = open_clip.create_model(name, pretrained=None)
        finally:
            logging.getLogger().removeFilter(drop)
        if local:
            load_clip_weights(model, Path(pretrained).expanduser())
    else:
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as exc:  # no network, hub refused, corrupt cache: all mean "no weights here"
            raise CheckpointError(
                f"the open_clip weights {name}/{pretrained} cannot be downloaded or loaded here "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); on a machine with network "
                f"access they are fetched into the Hugging Face cache (copy it over, or set HF_HUB_OFFLINE=1 with a "
                f"filled cache), or pass model.pretrained: /path/to/open_clip_state_dict.safetensors"
            ) from None
    model.eval()
    return model, open_clip.get_tokenizer(name)


FROZEN_SEED = 0  # the seed of every frozen CLIP with random weights


def create_frozen_clip(name: str, pretrained: Optional[str] = None) -> tuple[nn.Module, Tokenizer]:
    """:func:`create_clip` for a model that stays frozen: without ``pretrained`` its random weights come
    from :data:`FROZEN_SEED`, whatever the caller's random state, so every session (and every version) of
    a run, and every run, sees the same network; the caller's random state is left as it was. With
    ``pretrained`` the weights are the file's or the tag's, and the call is :func:`create_clip`'s."""
    if pretrained is not None:
        return create_clip(name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FROZEN_SEED)
        return create_clip(name)


def load_clip_weights(model: nn.Module, path: Path) -> None:
    """Load an open_clip state dict (tensors only) strictly into ``model``; the metadata entries of OpenAI's
    own state dicts (:data:`OPENAI_ONLY_KEYS`) are dropped — :func:`check_clip_spec` has made sure the
    architecture then uses QuickGELU."""
    state = load_state_dict(path)
    for key in OPENAI_ONLY_KEYS:
        state.pop(key, None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the open_clip model: {str(exc).splitlines()[0]}") from None


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features of normalised (B, 3, H, W) images."""
    return F.normalize(model.encode_image(images), dim=-1)


def encode_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text features of ``texts``, tokenised on the model's device."""
    device = next(model.parameters()).device
    return F.normalize(model.encode_text(tokenizer(list(texts)).to(device)), dim=-1)
