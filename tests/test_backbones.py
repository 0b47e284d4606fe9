"""Backbone registry, output shapes for both stems, and the embedding network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.nets.backbones import EmbeddingNet, build_backbone, list_backbones
from orchestrator.config import ModelConfig
from orchestrator.errors import ConfigError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))



@pytest.mark.parametrize("backbone, stem, out_dim", [("small_cnn", "cifar", 4 * 32), ("resnet18", "cifar", 512),
                                                     ("resnet18", "imagenet", 512), ("resnet50", "cifar", 2048)])
def test_forward_shape_and_out_dim(backbone, stem, out_dim):
    net = build_backbone(ModelConfig(backbone=backbone, stem=stem))
    assert net.out_dim == out_dim
    assert net(X).shape == (2, out_dim)


def test_stems():
    cifar = build_backbone(ModelConfig(backbone="resnet18", stem="cifar"))
    imagenet = build_backbone(ModelConfig(backbone="resnet18", stem="imagenet"))
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d) and isinstance(imagenet.fc, nn.Identity)


def test_small_cnn_width():
    assert build_backbone(ModelConfig(width=8)).out_dim == 32


def test_unknown_backbone_lists_the_choices():
    assert {"small_cnn", "resnet18", "resnet50"} <= set(list_backbones())
    with pytest.raises(ConfigError) as err:
        build_backbone(ModelConfig(backbone="vgg"))
    assert err.value.key == "model.backbone" and all(name in str(err.value) for name in list_backbones())


def test_embedding_net_dims_and_final_relu():
    net = EmbeddingNet(ModelConfig(embedding_dim=16, width=8))
    assert net.embedding_dim == 16 and net(X).shape == (2, 16)
    assert (net(X) < 0).any()
    wide = EmbeddingNet(ModelConfig(embedding_dim=16, width=8), embedding_dim=24)
    assert wide.embedding_dim == 24 and wide(X).shape == (2, 24)
    assert (EmbeddingNet(ModelConfig(width=8, final_relu=True))(X) >= 0).all()
