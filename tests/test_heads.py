"""methods/nets/heads.py: the shared embedding + classifier network and its served feature."""

import torch

from methods.nets.heads import ClassifierNet, served_embedding
from orchestrator.config import ModelConfig


def test_classifier_net_outputs_and_served_embedding():
    torch.manual_seed(0)
    net = ClassifierNet(ModelConfig(width=8, embedding_dim=16), num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    assert out["logits"].shape == (3, 5) and out["feature"].shape == (3, 16)
    assert torch.allclose(out["feature"].norm(dim=1), torch.ones(3), atol=1e-5)  # normalize: true
    assert net.classifier.bias is None
    served = served_embedding(net, x)
    assert torch.allclose(served, out["feature"], atol=1e-6)


def test_unnormalised_features_when_configured():
    net = ClassifierNet(ModelConfig(width=8, embedding_dim=16, normalize=False), num_classes=5).eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(out["feature"].norm(dim=1), torch.ones(2))
    assert torch.allclose(served_embedding(net, torch.randn(2, 3, 32, 32)).norm(dim=1), torch.ones(2), atol=1e-5)
