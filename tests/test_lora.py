"""LoRA on open_clip towers: base weights bit-identical, base outputs recoverable exactly, exact counts."""

import pytest
import torch

from methods.nets.clip_models import create_clip
from methods.nets.lora import add_lora, load_lora_state_dict, lora_disabled, lora_state_dict
from orchestrator.errors import CheckpointError, ConfigError


def tiny_clip():
    torch.manual_seed(0)
    return create_clip("tiny-vit-w32")[0].eval()  # width 32, 2 layers per tower, MLP width 128


def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=generator), torch.randint(1, 4000, (6, 16), generator=generator)


def train_a_little(model, images, tokens, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        loss = model.encode_image(images).pow(2).sum() + model.encode_text(tokens).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_base_weights_stay_bit_identical_and_the_base_model_is_recovered_exactly():
    model = tiny_clip()
    images, tokens = inputs()
    with torch.no_grad():
        before_image, before_text = model.encode_image(images), model.encode_text(tokens)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_lora(model, rank=4, alpha=8.0, targets=["q", "k", "v", "out_proj", "c_fc", "c_proj"])
    with torch.no_grad():  # B starts at zero: adapters change nothing until trained
        torch.testing.assert_close(model.encode_image(images), before_image, atol=1e-5, rtol=0)
    train_a_little(model, images, tokens)
    after = {name.replace(".base.", ".").replace(".base", ""): p for name, p in model.named_parameters()
             if ".lora_" not in name}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[name], base[name]) for name in base)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), before_image, atol=1e-3)  # the adapters learned
        with lora_disabled(model):
            assert torch.equal(model.encode_image(images), before_image)
            assert torch.equal(model.encode_text(tokens), before_text)
        assert not torch.allclose(model.encode_text(tokens), before_text, atol=1e-3)  # switched back on


def test_trainable_parameter_count_and_tower_selection():
    model = tiny_clip()
    names = add_lora(model, rank=4, alpha=4.0, targets=["q", "v"], towers=["image"])
    assert names == ["visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.1.attn"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # 2 blocks x 2 targets x (A: 4 x 32 + B: 32 x 4)
    assert sum(p.numel() for p in trainable) == 2 * 2 * (4 * 32 + 32 * 4)
    model = tiny_clip()
    add_lora(model, rank=2, alpha=4.0, targets=["c_fc"], towers=["text"])
    # 2 text blocks x (A: 2 x 32 + B: 128 x 2)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (2 * 32 + 128 * 2)


def test_adapter_state_round_trip():
    model = tiny_clip()
    images, tokens = inputs()
    add_lora(model, rank=2, alpha=4.0)
    train_a_little(model, images, tokens, steps=2)
    state = lora_state_dict(model)
    assert state and all(".lora_" in f".{k}" for k in state)
    fresh = tiny_clip()
    add_lora(fresh, rank=2, alpha=4.0)
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh.encode_text(tokens), model.encode_text(tokens))
    other = tiny_clip()
    add_lora(other, rank=2, alpha=4.0, targets=["q"])
    with pytest.raises(CheckpointError, match="does not fit"):
        load_lora_state_dict(other, state)


@pytest.mark.parametrize("kwargs, key", [
    ({"targets": ["qq"]}, "params.lora.targets"),
    ({"towers": ["audio"]}, "params.lora.towers"),
    ({"rank": 0}, "params.lora.rank"),
])
def test_bad_requests_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        add_lora(tiny_clip(), **{"rank": 2, "alpha": 1.0, **kwargs})
    assert err.value.key == key


@pytest.fixture(scope="module")
def timm_tower_model_name(tmp_path_factory):
    """``tiny-timm``: the tiny text tower with a timm ViT as image tower (no open_clip attention modules)."""
    import json

    import open_clip

    from methods.nets.clip_models import CONFIG_DIR

    directory = tmp_path_factory.mktemp("configs")
    config = json.loads((CONFIG_DIR / "tiny-vit-w32.json").read_text())
    config["vision_cfg"] = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                            "timm_pool": "token", "timm_proj": "linear", "image_size": 32}
    (directory / "tiny-timm.json").write_text(json.dumps(config))
    tiny_clip()  # registers the shipped configs first
    open_clip.add_model_config(directory)
    return "tiny-timm"


def test_a_requested_tower_that_gets_no_adapter_is_an_error(timm_tower_model_name):
    """A timm image tower has none of open_clip's attention/MLP modules: adapting it must fail loudly, not
    leave it unadapted while the text tower is adapted."""
    from methods.nets.clip_models import create_clip, model_config
    from methods.nets.lora import check_towers

    model = create_clip(timm_tower_model_name)[0]
    with pytest.raises(ConfigError, match="image tower \\(TimmModel\\).*no adapter") as err:
        add_lora(model, rank=2, alpha=4.0, towers=["image", "text"])
    assert err.value.key == "params.lora.towers"
    assert add_lora(create_clip(timm_tower_model_name)[0], rank=2, alpha=4.0, towers=["text"])  # text alone is fine
    with pytest.raises(ConfigError, match="image tower of tiny-timm is the timm model 'vit_tiny_patch16_224'"):
        check_towers(model_config(timm_tower_model_name), timm_tower_model_name, ["image"], "methods.1.params.lora.towers")
    check_towers(model_config("tiny-vit-w32"), "tiny-vit-w32", ["image", "text"], "k")
    with pytest.raises(ConfigError, match="ModifiedResNet"):
        check_towers(model_config("RN50"), "RN50", ["text", "image"], "k")


def test_a_cross_modal_config_with_an_unadaptable_tower_fails_validation(timm_tower_model_name):
    from test_xbt import TINY

    from orchestrator.engine.validate import parse_experiment

    cfg = {**TINY, "models": {"old": {"name": "tiny-vit-w32"}, "new": {"name": timm_tower_model_name}}}
    with pytest.raises(ConfigError) as err:
        parse_experiment(cfg)
    assert err.value.key == "methods.1.params.lora.towers"
    parse_experiment({**cfg, "methods": [{"name": "xbt", "params": {"hidden": 16, "lora": {"towers": ["text"]}}}]})
