"""Which Ray cluster a driver uses: `ray.init`'s rule joins a cluster started with `ray start` on this
machine, which `ensure_ray` names in one line; `RAY_ADDRESS=local` starts a private cluster anyway.

The head runs under `ray start --head --block` in its own session, with RAY_TMPDIR pointing at a temp dir
of its own: Ray looks for a running cluster in `$RAY_TMPDIR/ray/ray_current_cluster`, so only this
test's driver can find it, and SIGTERM to that one process stops it (never `ray stop`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import free_port, stop_ray_head, tail

pytestmark = pytest.mark.integration

HEAD_START_TIMEOUT_S = 60


@pytest.fixture
def running_head(monkeypatch):
    """A one-node, one-CPU cluster started with `ray start`, discoverable only through this test's
    RAY_TMPDIR (set for the test); yields its GCS address."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayconn-", dir="/tmp"))  # short: Ray's socket paths live under it
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(temp_dir), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    command = [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1",
               "--num-gpus=0", "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
    log = open(temp_dir / "head.log", "wb")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = temp_dir / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not address_file.exists() or not address_file.read_text().strip():
            if head.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{tail(temp_dir / 'head.log')}")
            if time.monotonic() > deadline:
                pytest.fail(f"no cluster address after {HEAD_START_TIMEOUT_S} s:\n{tail(temp_dir / 'head.log')}")
            time.sleep(0.5)
        monkeypatch.setenv("RAY_TMPDIR", str(temp_dir))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        yield address_file.read_text().strip()
    finally:
        import ray

        ray.shutdown()
        stop_ray_head(head)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_a_running_cluster_is_joined_and_named_and_ray_address_local_starts_a_private_one(running_head, monkeypatch):
    import ray
    import ray._private.worker

    from orchestrator.engine.executor import ensure_ray

    lines: list[str] = []
    ensure_ray(echo=lines.append)
    assert ray.get_runtime_context().gcs_address == running_head
    assert lines == [f"Joined the Ray cluster at {running_head} (found running on this machine; RAY_ADDRESS=local "
                     f"starts a private one): 1 node, 1 CPU, 0 GPUs"]
    ray.shutdown()

    monkeypatch.setenv("RAY_ADDRESS", "local")
    lines.clear()
    ensure_ray(echo=lines.append)
    assert ray.get_runtime_context().gcs_address != running_head  # a cluster of its own, next to the running one
    assert lines == []
    assert not ray._private.worker._global_node.address_info.get("webui_url")  # the private branch's settings
