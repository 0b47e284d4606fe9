"""CPE-CLIP's formulas: α_t, its exact effect on one SGD step, old-class masking, the template, the LR list."""

import pytest
import torch

from methods.base import StepContext, create_method
from methods.cpe_clip import class_text, mask_old_logits, scale_gradients, session_alpha
from orchestrator.config import ModelConfig, TrainingConfig
from orchestrator import load_config
from orchestrator.errors import ConfigError
from orchestrator.engine.loop import lr_at


def test_alpha_is_new_over_seen_classes():
    assert session_alpha(5, 65) == pytest.approx(0.0769, abs=1e-4)  # CIFAR-100 / miniImageNet S1
    assert session_alpha(5, 100) == 0.05  # S8
    assert session_alpha(10, 110) == pytest.approx(0.0909, abs=1e-4)  # CUB S1
    assert session_alpha(10, 200) == 0.05  # CUB S10
    with pytest.raises(ValueError):
        session_alpha(0, 60)


def test_alpha_scales_the_gradient_exactly_and_leaves_weight_decay_unscaled():
    lr, wd, alpha = 0.1, 0.01, 5 / 65
    start = torch.tensor([1.0, -2.0, 0.5])
    grad = torch.tensor([0.3, 0.2, -0.4])

    def one_step(factor):
        p = torch.nn.Parameter(start.clone())
        p.grad = grad.clone()
        if factor is not None:
            scale_gradients([p], factor)
        torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=wd).step()
        return p.detach()

    assert torch.allclose(one_step(None), start - lr * (grad + wd * start))
    assert torch.allclose(one_step(alpha), start - lr * (alpha * grad + wd * start))


@pytest.mark.parametrize("index, params, factor", [
    (1, {}, 2 / 6),  # session 1: 2 new classes of 6 seen
    (0, {}, 1.0),  # the base session is not regularised
    (1, {"regularization": False}, 1.0),
])
def test_after_backward_scales_the_prompt_and_projection_gradients_before_the_sgd_step(index, params, factor):
    """The method's own hook, between backward and the optimiser step: the gradients of exactly the prompts
    and the projection are multiplied by α = |new| / |seen| (by hand: 2/6) in incremental sessions, the
    frozen CLIP gets none, and one SGD step with weight decay then moves the prompts by
    −lr·(α·g + wd·p): the decay unscaled."""
    from orchestrator.engine.loop import build_optimizer

    method = create_method("cpe_clip", params, ModelConfig(name="tiny-vit-w32"))
    names = ["apple", "bear", "cloud", "dune", "eagle", "fern"]
    num_previous = 4 if index else 0
    context = StepContext(index=index, num_steps=3, num_seen=6, num_previous=num_previous, event="finetune",
                          model=method.model_cfg, seed=0, extras={"class_names": names},
                          training=TrainingConfig(optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=0.1))
    model = method.init_model(context)
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert set(trainable) == {"prompts", "projection.weight", "projection.bias"}
    images, labels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([4, 5, 4])
    loss, _ = method.loss(model(images), images, labels, {}, context)
    loss.backward()
    raw = {n: p.grad.clone() for n, p in trainable.items()}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    method.after_backward(model, {}, context)
    for n, p in trainable.items():
        assert torch.allclose(p.grad, factor * raw[n], rtol=1e-6, atol=0) and raw[n].abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    build_optimizer(method.trainable_parameters(model), context.training).step()
    for n, p in trainable.items():
        assert torch.allclose(p.detach(), start[n] - 0.5 * (factor * raw[n] + 0.1 * start[n]), atol=1e-6)


def test_old_class_logits_are_masked_to_minus_9999():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert mask_old_logits(logits, 2).tolist() == [[-9999.0, -9999.0, 3.0, 4.0]]
    assert logits.tolist() == [[1.0, 2.0, 3.0, 4.0]]  # not in place


def ctx(index, num_previous, num_seen):
    return StepContext(index=index, num_steps=3, num_seen=num_seen, num_previous=num_previous, event="finetune",
                       model=ModelConfig(name="tiny-vit-w32"), training=TrainingConfig(label_smoothing=0.0), seed=0)


def test_masking_applies_to_incremental_sessions_only():
    method = create_method("cpe_clip", {}, ModelConfig(name="tiny-vit-w32"))
    outputs = {"logits": torch.tensor([[5.0, 0.0, 0.0]])}
    base, _ = method.loss(outputs, None, torch.tensor([2]), {}, ctx(0, 0, 3))
    incremental, _ = method.loss(outputs, None, torch.tensor([2]), {}, ctx(1, 2, 3))
    assert base.item() == pytest.approx(torch.log(torch.exp(torch.tensor(5.0)) + 2).item(), abs=1e-5)
    assert incremental.item() == pytest.approx(0.0, abs=1e-6)  # only the new class is left
    unmasked = create_method("cpe_clip", {"mask_old_classes": False}, ModelConfig(name="tiny-vit-w32"))
    assert unmasked.loss(outputs, None, torch.tensor([2]), {}, ctx(1, 2, 3))[0].item() == pytest.approx(base.item())


def test_class_names_become_text_through_the_template():
    assert class_text("{}.", "apple") == "apple."
    assert class_text("{}.", "aquarium_fish") == "aquarium fish."
    assert class_text("a photo of a {}.", "001.Black_footed_Albatross") == "a photo of a Black footed Albatross."


def test_reference_lr_list_comes_from_the_config():
    training = TrainingConfig(epochs=5, optimizer="sgd", lr_schedule=[0.001 + 0.00198 * e for e in range(6)])
    assert [round(lr_at(e, training), 5) for e in range(5)] == [0.001, 0.00298, 0.00496, 0.00694, 0.00892]
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainingConfig(epochs=7, lr_schedule=[0.001] * 6)


def test_configs_are_checked_against_the_model():
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["methods=[{name: cpe_clip}]"])
    with pytest.raises(ConfigError, match="prompt_depth"):
        load_config(None, ["model.name=tiny-vit-w32", "methods=[{name: cpe_clip, params: {prompt_depth: 3}}]"])
    with pytest.raises(ConfigError, match="template"):
        load_config(None, ["model.name=tiny-vit-w32", "methods=[{name: zero_shot_clip, params: {template: 'x'}}]"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ["model.name=tiny-vit-w32", "model.pretrained=/no/such/file.pt",
                           "methods=[{name: zero_shot_clip}]"])
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["model.name=no-such-clip", "methods=[{name: zero_shot_clip}]"])


def test_protocol_presets_plan_the_standard_sessions(tmp_path):
    from orchestrator.engine.scenarios import plan_steps

    cifar = load_config("fscil_cifar100")
    assert [s.num_seen for s in plan_steps(cifar, 100)] == [60 + 5 * t for t in range(9)]
    assert cifar.model.name == "ViT-B-16-quickgelu" and cifar.model.pretrained == "openai"
    root, lists = tmp_path / "cub", tmp_path / "lists"
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    for c in range(200):  # a readable image per class: validation indexes the splits before planning
        for split in ("train", "test"):
            (root / split / f"{c + 1:03d}.Bird_{c}").mkdir(parents=True)
            (root / split / f"{c + 1:03d}.Bird_{c}" / "0.png").write_bytes(png.getvalue())
    lists.mkdir()
    for t in range(11):
        (lists / f"session_{t + 1}.txt").write_text("x\n")
    cub = load_config("fscil_cub200", [f"data.root={root}", f"scenario.session_files={lists}"])
    steps = plan_steps(cub, 200)
    assert [s.num_seen for s in steps] == [100 + 10 * t for t in range(11)] and steps[1].shots == 5
    assert cub.method_training(cub.methods[2]).batch_size == 4 and cub.method_training(cub.methods[2]).epochs == 6
    assert cub.method_training(cub.methods[2], step=1).epochs == 5
