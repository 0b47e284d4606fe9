"""The `ray job submit` launch path: a head started with `ray start --head` accepts `compat run` as a job.

The head runs under `ray start --block` in its own session and temp dir, so stopping it (SIGTERM to that
one process, which tears down everything it started) never touches another Ray cluster on the machine:
plain `ray stop` would stop every Ray process of the user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import TINY_WORKER_RUN, free_port, stop_ray_head, tail

pytestmark = pytest.mark.integration

HEAD_START_TIMEOUT_S = 60  # with the job limit: the test fails within about 3 minutes
JOB_TIMEOUT_S = 120
TINY = TINY_WORKER_RUN


@pytest.fixture
def ray_head():
    """A one-node cluster with the dashboard's job server on loopback; yields its dashboard address."""
    pytest.importorskip("ray.dashboard.optional_deps",
                        reason="the Ray job server needs the dashboard: pip install 'compat-orchestrator[jobs]'")
    from ray.job_submission import JobSubmissionClient

    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))  # short: Ray's socket paths live under it
    dashboard = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),  # the job's `python`
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # nothing to drain: skip the 30 s wait on SIGTERM
    command = [
        str(Path(bin_dir) / "ray"), "start", "--head", "--block", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    log = open(temp_dir / "head.log", "wb")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{tail(temp_dir / 'head.log')}")
            try:
                JobSubmissionClient(address)
                break
            except Exception:  # the dashboard is not serving yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the job server did not come up in {HEAD_START_TIMEOUT_S} s:\n{tail(temp_dir / 'head.log')}")
                time.sleep(1)
        yield address
    finally:
        stop_ray_head(head)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_quickstart_runs_as_a_ray_job(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    sets = " ".join(f"--set '{item}'" for item in [*TINY, f"output_dir={tmp_path}"])
    entrypoint = f"python -m orchestrator.cli run quickstart --no-progress {sets}"
    job_id = client.submit_job(entrypoint=entrypoint, submission_id="compat-quickstart-smoke")
    assert job_id == "compat-quickstart-smoke"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        if not status.is_terminal():
            client.stop_job(job_id)
        pytest.fail(f"job {job_id} is {status} (limit {JOB_TIMEOUT_S} s); its log:\n{client.get_job_logs(job_id)[-4000:]}")

    run_dir = tmp_path / "quickstart"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    group = json.loads((run_dir / "manifest" / "independent" / "step-000.json").read_text())["group"]
    assert (run_dir / "ray" / f"quickstart-{group}").is_dir()  # trained by a Ray Train run on the head
    assert list(metrics["methods"]) == ["independent"]
    assert metrics["methods"]["independent"]["num_versions"] == 2
    assert "tasks done" in client.get_job_logs(job_id)
    with pytest.raises(RuntimeError, match="already exists"):  # a deterministic id refuses a second copy
        client.submit_job(entrypoint=entrypoint, submission_id=job_id)
