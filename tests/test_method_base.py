"""The Method contract: registry, factory, and safe checkpoint loading."""

import pickle

import pytest
import torch

from methods.base import StepContext, create_method, list_methods, load_state_dict
from orchestrator.config import ModelConfig, TrainingConfig
from orchestrator.errors import CheckpointError, ConfigError


def ctx(num_seen=4, index=0, **kw):
    return StepContext(index=index, num_steps=2, num_seen=num_seen, num_previous=0, event="train",
                       model=ModelConfig(width=8, embedding_dim=8), training=TrainingConfig(), seed=0, **kw)


def test_registry_lists_builtin_methods():
    assert {"independent", "bct"} <= set(list_methods())


def test_factory_validates_params():
    with pytest.raises(ConfigError) as err:
        create_method("bct", {"weight": -1}, ModelConfig(), key="methods.1")
    assert err.value.key == "methods.1.params.weight"


class Evil:
    """An arbitrary object: unpickling it would run code from the checkpoint's author."""


def test_safe_loading_refuses_pickled_objects(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1), "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="safely"):
        load_state_dict(path)
    (tmp_path / "bad.pt").write_bytes(pickle.dumps("not a checkpoint")[:5])
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt")


def test_classifier_grows_when_loading_an_older_version(tmp_path):
    method = create_method("independent", {}, ModelConfig(width=8, embedding_dim=8))
    old = method.build_model(ctx(num_seen=4))
    torch.save(old.state_dict(), tmp_path / "model.pt")
    new = method.build_model(ctx(num_seen=6))
    method.load_weights(new, str(tmp_path), strict=False)
    assert torch.equal(new.classifier.weight[:4], old.classifier.weight)
    for (name, a), b in zip(old.net.state_dict().items(), new.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_shape_mismatch_is_a_clear_error(tmp_path):
    method = create_method("independent", {}, ModelConfig(width=8, embedding_dim=8))
    other = create_method("independent", {}, ModelConfig(width=8, embedding_dim=16)).build_model(ctx())
    torch.save(other.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="shape"):
        method.load_weights(method.build_model(ctx()), str(tmp_path), strict=False)
    with pytest.raises(CheckpointError, match="does not fit"):
        method.load_version(ctx(), str(tmp_path))
