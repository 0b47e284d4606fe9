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
