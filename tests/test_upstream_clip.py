"""The captioned synthetic dataset and the cached, deterministic upstream CLIP stage."""

import numpy as np
import pytest
import torch

from methods.nets.clip_models import create_clip
from orchestrator.config import DataConfig, UpstreamClipConfig
from orchestrator import load_config
from orchestrator.data import load_split
from orchestrator.data.captions import CAPTION_TEMPLATES, caption_texts, load_captioned, shifted_templates
from orchestrator.errors import ConfigError, DataError
from orchestrator.engine.upstream_clip import multi_positive_clip_loss, pretrain_clip, recipe_key

DATA = DataConfig(num_classes=4, train_per_class=10, test_per_class=5)


def test_captions_name_the_class_with_distinct_templates_deterministically():
    labels = np.array([0, 1, 1])
    names = ["bafoki", "dumilo"]
    captions = caption_texts(labels, names, per_image=3, seed=0)
    assert captions == caption_texts(labels, names, per_image=3, seed=0)
    assert all(len(set(c)) == 3 and all(names[label] in text for text in c) for c, label in zip(captions, labels))
    assert {t for c in caption_texts(np.zeros(50, int), names, 2, seed=1) for t in c} == \
        {t.format("bafoki") for t in CAPTION_TEMPLATES}


def test_captioned_split_links_every_caption_to_its_image():
    data = load_captioned(DATA, "test", captions_per_image=2)
    assert len(data.captions) == 2 * len(data.images) == len(data.caption_of) == len(data.caption_ids)
    assert np.array_equal(data.caption_of, np.repeat(data.images.sample_ids, 2))
    names = data.images.class_names
    assert all(names[label] in text for text, label in zip(data.captions, data.caption_labels))
    assert np.array_equal(data.images.images, load_split(DATA, "test").images)


def test_shifted_images_are_other_draws_of_the_same_classes():
    shifted = load_captioned(DATA, captions_per_image=1, shift=0.5, per_class=6)
    train = load_split(DATA, "train")
    assert shifted.images.images.shape == (24, 32, 32, 3)
    assert np.bincount(shifted.images.labels).tolist() == [6] * 4
    assert not np.isin(shifted.images.images.reshape(24, -1).sum(1), train.images.reshape(40, -1).sum(1)).all()
    templates = np.random.default_rng(0).uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
    assert np.allclose(shifted_templates(templates, 0.0), templates, atol=1e-6)
    assert not np.allclose(shifted_templates(templates, 1.0), templates, atol=1e-2)
    with pytest.raises(DataError, match="synthetic"):
        load_captioned(DataConfig(dataset="cifar10"), shift=0.5)


def test_every_caption_of_the_same_class_is_a_positive():
    features = torch.eye(3)
    loss = multi_positive_clip_loss(features, features, torch.tensor([0, 1, 2]), torch.tensor(10.0))
    clip_style = torch.nn.functional.cross_entropy(10 * features, torch.arange(3))
    assert loss.item() == pytest.approx(clip_style.item())
    shared = torch.eye(3)[[0, 0, 1]]  # two images (and captions) of class 0 embed identically
    same = multi_positive_clip_loss(shared, shared, torch.tensor([0, 0, 1]), torch.tensor(100.0))
    assert same.item() == pytest.approx(2 / 3 * np.log(2), abs=1e-4)  # the entropy of the targets: the minimum


def test_upstream_clip_is_deterministic_cached_and_loadable(tmp_path):
    recipe = UpstreamClipConfig(images_per_class=8, epochs=2, batch_size=16)
    first = pretrain_clip("tiny-vit-w32", recipe, DATA, tmp_path / "a")
    second = pretrain_clip("tiny-vit-w32", recipe, DATA, tmp_path / "b")
    a, b = first.load_torch("model.pt"), second.load_torch("model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = first.local_path("model.pt").stat().st_mtime_ns
    assert pretrain_clip("tiny-vit-w32", recipe, DATA, tmp_path / "a") == first
    assert first.local_path("model.pt").stat().st_mtime_ns == stamp  # cached, not retrained
    meta = first.read_json("meta.json")
    assert meta["model"] == "tiny-vit-w32" and len(meta["zero_shot_per_class"]) == 4
    model, _ = create_clip("tiny-vit-w32", str(first.local_path("model.pt")))
    assert torch.equal(model.state_dict()["visual.proj"], a["visual.proj"])
    assert recipe_key("tiny-vit-w32", recipe, DATA) != recipe_key("tiny-vit-w32", UpstreamClipConfig(epochs=3), DATA)


def test_upstream_section_needs_a_clip_and_synthetic_data():
    with pytest.raises(ConfigError, match="upstream_clip"):
        load_config(None, ["upstream_clip={epochs: 1}"])
    with pytest.raises(ConfigError, match="upstream_clip"):
        load_config(None, ["upstream_clip={epochs: 1}", "model.name=tiny-vit-w32", "model.pretrained=openai"])
