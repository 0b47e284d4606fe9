"""Backbones (a registry and one factory) and the embedding network every method builds on.

A backbone maps images (B, 3, H, W) to pooled features (B, out_dim); :class:`EmbeddingNet` adds the
linear embedding layer. Methods never construct torchvision models themselves, so the backbone choice
stays a config value (``model.backbone``) shared by every version of an experiment.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models

from orchestrator.config import ModelConfig
from orchestrator.registry import Registry

BACKBONES: Registry[Callable[[ModelConfig], nn.Module]] = Registry("backbone", "model.backbone")


def register_backbone(name: str) -> Callable:
    """Decorator for ``builder(cfg) -> nn.Module``; the module must expose ``out_dim``."""
    return BACKBONES.register(name)


def list_backbones() -> list[str]:
    return BACKBONES.names()


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone ``cfg.backbone`` with fresh (random) weights; ``.out_dim`` is its feature width."""
    return BACKBONES.get(cfg.backbone)(cfg)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Sequential):
    """Three conv-BN-ReLU blocks (width, 2*width, 4*width), max-pooling between them, global average pool.

    Small enough to train an 8-epoch step on a few thousand 32x32 images in seconds on two CPU cores;
    it runs in channels-last memory layout, about twice as fast on CPU (and preferred by GPU kernels).
    """

    def __init__(self, width: int):
        super().__init__(
            *_conv_bn_relu(3, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


@register_backbone("small_cnn")
def _small_cnn(cfg: ModelConfig) -> nn.Module:
    return SmallCNN(cfg.width)


def _resnet(factory: Callable[..., models.ResNet], cfg: ModelConfig) -> nn.Module:
    """A torchvision ResNet without its fc. The "cifar" stem (3x3 stride-1 conv, no max-pool) keeps
    spatial resolution for 32x32 inputs; "imagenet" is torchvision's 7x7 stride-2 conv + max-pool."""
    net = factory(weights=None)
    if cfg.stem == "cifar":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


@register_backbone("resnet18")
def _resnet18(cfg: ModelConfig) -> nn.Module:
    return _resnet(models.resnet18, cfg)


@register_backbone("resnet50")
def _resnet50(cfg: ModelConfig) -> nn.Module:
    return _resnet(models.resnet50, cfg)


class EmbeddingNet(nn.Module):
    """backbone -> Linear(out_dim, embedding_dim) -> optional ReLU; returns the unnormalised embedding.

    ``embedding_dim`` overrides ``cfg.embedding_dim`` for methods that widen the embedding (e.g. OCA).
    """

    def __init__(self, cfg: ModelConfig, embedding_dim: int | None = None):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.embedding_dim = embedding_dim or cfg.embedding_dim
        self.embedding = nn.Linear(self.backbone.out_dim, self.embedding_dim)
        self.embedding_bn = nn.BatchNorm1d(self.embedding_dim) if cfg.embedding_bn else nn.Identity()
        self.final_relu = cfg.final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embedding_bn(self.embedding(self.backbone(x)))
        return torch.relu(h) if self.final_relu else h
