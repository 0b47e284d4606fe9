"""CPE-CLIP's prompted towers: insertion positions, token counts, parameter count, what trains and what is saved."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from methods.nets.clip_models import create_clip
from methods.nets.prompted_clip import (PromptedClip, check_room_for_prompts, extend_prompts, insert_after_start,
                                   pooled_positions, xavier_prompts)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_clip("tiny-vit-w64")  # 4 layers per tower, text width 64, vision width 64, context 16


def prompted(clip, length=2, depth=4, mode="accumulate"):
    torch.manual_seed(1)
    return PromptedClip(clip, length, depth, mode, 100.0)


def test_without_prompts_the_towers_are_open_clips_own(tiny):
    clip, tokenizer = tiny
    tokens = tokenizer(["a photo of a bafoki.", "x.", "the lorem ipsum pattern."])
    images = torch.randn(2, 3, 32, 32)
    model = PromptedClip(clip, 0, 0, None, 100.0)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), F.normalize(clip.encode_text(tokens), dim=-1), atol=1e-6)
        assert torch.allclose(model.encode_image(images), F.normalize(clip.encode_image(images), dim=-1), atol=1e-6)
    assert not [p for p in model.parameters() if p.requires_grad]


def test_text_prompts_follow_the_start_token_and_shift_the_pooled_token(tiny):
    x = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    prompts = torch.full((2, 1), -1.0)
    out = insert_after_start(x, prompts)
    assert out.shape == x.shape  # two trailing positions dropped to make room
    assert out[0, :, 0].tolist() == [0, -1, -1, 1, 2, 3]
    tokens = torch.tensor([[49406, 320, 49407, 0, 0, 0], [49406, 320, 1125, 269, 49407, 0]])
    assert pooled_positions(tokens, 2, "argmax", None).tolist() == [4, 6]
    assert pooled_positions(tokens, 2, "eos", 49407).tolist() == [4, 6]
    with pytest.raises(ValueError, match="prompt tokens need"):
        check_room_for_prompts(tokens, 2)


def test_prompted_text_feature_is_read_at_the_shifted_end_of_text(tiny):
    clip, tokenizer = tiny
    model = prompted(clip)
    tokens = tokenizer(["a bafoki."])
    eot = int(tokens.argmax())
    seen = {}
    handle = clip.ln_final.register_forward_hook(lambda m, i, out: seen.setdefault("tokens", out))
    with torch.no_grad():
        feature = model.encode_text(tokens)
    handle.remove()
    expected = F.normalize(seen["tokens"][0, eot + 2] @ clip.text_projection, dim=-1)
    assert torch.allclose(feature[0], expected, atol=1e-6)


def token_counts(model, clip, images):
    counts = []
    hooks = [block.register_forward_pre_hook(lambda m, args, kwargs: counts.append(args[0].shape[1]), with_kwargs=True)
             for block in clip.visual.transformer.resblocks]
    with torch.no_grad():
        model.encode_image(images)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("mode, expected", [("accumulate", [19, 21, 23, 25]), ("accumulate_same", [19, 21, 23, 25]),
                                            ("replace", [19, 19, 19, 19])])
def test_vision_token_count_grows_by_the_prompt_length_per_layer(tiny, mode, expected):
    clip, _ = tiny  # 16 patches + CLS = 17 tokens
    assert token_counts(prompted(clip, mode=mode), clip, torch.randn(2, 3, 32, 32)) == expected


def test_accumulate_keeps_earlier_prompt_outputs_and_accumulate_same_repeats_raw_prompts():
    x = torch.zeros(1, 3 + 2, 1)  # 3 image tokens + 2 prompt outputs of layer 0
    x[0, 3:, 0] = torch.tensor([7.0, 8.0])
    prompts = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    assert extend_prompts(x, 3, prompts[1], prompts, 1, "accumulate")[0, :, 0].tolist() == [0, 0, 0, 7, 8, 3, 4]
    assert extend_prompts(x, 3, prompts[1], prompts, 1, "accumulate_same")[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert extend_prompts(x, 3, prompts[1], prompts, 1, "replace")[0, :, 0].tolist() == [0, 0, 0, 3, 4]


def test_xavier_bound_of_the_reference_prompt_tensor():
    g = xavier_prompts(12, 2, 512)
    bound = math.sqrt(6 / (2 * 512 + 12 * 512))
    assert abs(bound - 0.0289) < 1e-4
    assert g.abs().max() <= bound and g.abs().max() > 0.95 * bound


def test_vit_b16_has_exactly_406272_trainable_parameters():
    clip = open_clip.create_model("ViT-B-16", pretrained=None)  # random weights, no download
    model = PromptedClip(clip, 2, 12, "accumulate", 100.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 12 * 2 * 512 + 512 * 768 + 768 == 406_272


def test_only_prompts_and_projection_get_gradients_and_only_they_are_saved(tiny):
    clip, tokenizer = tiny
    model = prompted(clip)
    model.set_class_tokens(tokenizer(["bafoki.", "dumilo.", "zekara."]))
    frozen = {k: v.clone() for k, v in clip.state_dict().items()}
    model.train()
    assert not clip.training  # the frozen CLIP stays in eval mode
    out = model(torch.randn(4, 3, 32, 32))
    F.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 0])).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"prompts", "projection.weight", "projection.bias"}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(frozen[k], v) for k, v in clip.state_dict().items())
    state = model.state_dict()
    assert set(state) == {"prompts", "projection.weight", "projection.bias"}
    fresh = prompted(create_clip("tiny-vit-w64")[0])
    fresh.load_state_dict(state)  # strict: the frozen CLIP is not "missing"
    assert torch.equal(fresh.prompts, model.prompts)
