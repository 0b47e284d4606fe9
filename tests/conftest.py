"""Shared fixtures. Ray-backed tests share one local cluster per module (ray.init costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # hermetic local clusters in tests
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# a run's lease expires 5 s after its driver's last heartbeat (default 60 s), so a sweep trial restarted
# after its simulation was killed waits seconds, not a minute, for the old lease (orchestrator/storage/lease.py)
os.environ.setdefault("COMPAT_LEASE_EXPIRY_S", "5")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Synthetic datasets are cached once per test session, never in the user's home (session-scoped,
    so module-scoped fixtures that run experiments see the same cache as the tests)."""
    previous = os.environ.get("COMPAT_CACHE_DIR")
    os.environ["COMPAT_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if previous is None:
        os.environ.pop("COMPAT_CACHE_DIR", None)
    else:
        os.environ["COMPAT_CACHE_DIR"] = previous


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test batches gain nothing from intra-op threads, and thread barriers stall on a busy 2-core box."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a cluster found running
    yield
    ray.shutdown()
