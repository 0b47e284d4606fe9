"""open_clip models by name: the QuickGELU/GELU trap of OpenAI's weights, on tiny generated weight files."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from methods.nets.clip_models import (CONFIG_DIR, check_clip_spec, create_clip, load_clip_weights, uses_quick_gelu)
from orchestrator.errors import ConfigError

TINY = "tiny-vit-w32"


@pytest.fixture(scope="module")
def tiny_quickgelu(tmp_path_factory):
    """``tiny-vit-w32-quickgelu``: the shipped tiny architecture with QuickGELU, as open_clip names its twins."""
    directory = tmp_path_factory.mktemp("configs")
    config = json.loads((CONFIG_DIR / f"{TINY}.json").read_text())
    (directory / f"{TINY}-quickgelu.json").write_text(json.dumps({**config, "quick_gelu": True}))
    create_clip(TINY)  # registers the shipped tiny configs first
    open_clip.add_model_config(directory)
    return f"{TINY}-quickgelu"


def tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in open_clip.create_model(TINY).state_dict().items()}


def test_a_tag_trained_with_quickgelu_is_refused_for_a_gelu_architecture():
    assert not uses_quick_gelu("ViT-B-16") and uses_quick_gelu("ViT-B-16-quickgelu")
    with pytest.raises(ConfigError, match="model.name.*QuickGELU.*'ViT-B-16-quickgelu'"):
        check_clip_spec("ViT-B-16", "openai", "model")
    with pytest.raises(ConfigError, match="models.old.name.*'ViT-B-32-quickgelu'"):
        check_clip_spec("ViT-B-32", "openai", "models.old")
    check_clip_spec("ViT-B-16-quickgelu", "openai", "model")  # no download: only the tag's configuration is read
    check_clip_spec("ViT-B-16", "laion2b_s34b_b88k", "model")  # GELU weights, GELU architecture


def test_a_local_file_named_as_openais_is_refused_for_a_gelu_architecture(tmp_path, tiny_quickgelu):
    path = tmp_path / "models--timm--vit_tiny_clip.openai" / "snapshots" / "abc" / "open_clip_model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(tiny_weights(), str(path))
    with pytest.raises(ConfigError, match=f"model.name.*OpenAI.*'{tiny_quickgelu}'"):
        check_clip_spec(TINY, str(path), "model")
    with pytest.raises(ConfigError, match="QuickGELU"):
        create_clip(TINY, str(path))
    model, _ = create_clip(tiny_quickgelu, str(path))
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert all(torch.equal(v, tiny_weights()[k]) for k, v in model.state_dict().items())
    plain = tmp_path / "laion_tiny.safetensors"  # nothing says OpenAI: loads into the GELU architecture
    save_file(tiny_weights(), str(plain))
    check_clip_spec(TINY, str(plain), "model")


def test_openais_own_state_dict_keys_are_recognised_and_dropped_on_load(tmp_path, tiny_quickgelu):
    state = {**tiny_weights(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
             "vocab_size": torch.tensor(49408)}
    path = tmp_path / "clip_weights.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="OpenAI's own state-dict keys"):
        check_clip_spec(TINY, str(path), "model")
    model = open_clip.create_model(tiny_quickgelu)
    load_clip_weights(model, path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_torchscript_archive_is_refused_with_how_to_convert_it(tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ConfigError, match="model.pretrained.*TorchScript.*-quickgelu"):
        check_clip_spec(TINY, str(path), "model")


def test_preprocessing_comes_from_the_pretrained_tag():
    from methods.nets.clip_models import clip_input_spec

    siglip = clip_input_spec("ViT-B-16-SigLIP", "webli")
    assert (siglip.mean, siglip.std, siglip.interpolation) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert clip_input_spec("ViT-B-16-SigLIP").mean == (0.5, 0.5, 0.5)  # a file or random weights: all tags agree
    openai = clip_input_spec("ViT-B-16-quickgelu", "openai")
    assert openai.size == 224 and openai.interpolation == "bicubic"
    assert openai.mean == open_clip.OPENAI_DATASET_MEAN and openai.std == open_clip.OPENAI_DATASET_STD


@pytest.mark.parametrize("interpolation, in_size", [("bicubic", 32), ("bicubic", 84), ("bicubic", 300),
                                                     ("bilinear", 32), ("bilinear", 300)])
def test_clip_inputs_are_resized_exactly_as_pil_resizes(interpolation, in_size):
    """CLIP's own preprocessing resizes with PIL; the batched transform matches it within one grey level
    (PIL's fixed-point weights), upsampling and downsampling (antialiased) alike."""
    import numpy as np
    from PIL import Image

    from orchestrator.data.transforms import BatchTransform

    rng = np.random.default_rng(in_size)
    images = rng.integers(0, 256, (3, in_size, in_size, 3), dtype=np.uint8)
    images[0, : in_size // 2] = 255  # a hard edge, where the cubic kernel overshoots and PIL clips
    got = BatchTransform((0, 0, 0), (1, 1, 1), augment=False, size=224, interpolation=interpolation)(
        torch.from_numpy(images)).permute(0, 2, 3, 1).numpy() * 255
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    want = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), resample)) for im in images]).astype(float)
    assert np.abs(got - want).max() <= 1.0 + 1e-3 and np.abs(got - want).mean() < 0.05


def test_the_clip_transform_matches_open_clips_own_preprocessing():
    import numpy as np
    from PIL import Image

    from methods.nets.clip_models import clip_input_spec
    from orchestrator.data.transforms import BatchTransform

    spec = clip_input_spec("ViT-B-16-quickgelu", "openai")
    theirs = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std,
                                       interpolation=spec.interpolation, resize_mode="shortest")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = BatchTransform(spec.mean, spec.std, augment=False, size=spec.size, interpolation=spec.interpolation)
    got = ours(torch.from_numpy(image[None]))[0]
    want = theirs(Image.fromarray(image))
    assert got.shape == want.shape == (3, 224, 224)
    assert (got - want).abs().max() <= 1.0 / 255 / min(spec.std) + 1e-5
