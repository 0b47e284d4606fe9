"""Runs as Ray jobs: deploy/local-walkthrough.sh does docs/guide/jobs.md's walkthrough end to end on
a head started with token authentication, and `compat` refuses a relative run location inside a job
whose --working-dir copy would hold it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orchestrator import cli

from helpers import TINY_WORKER_RUN, free_port, kill_pids_mentioning, without_ray_settings

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "deploy" / "local-walkthrough.sh"
WALKTHROUGH_TIMEOUT_S = 300
TINY = TINY_WORKER_RUN


# -- the walkthrough -------------------------------------------------------------------------------
@pytest.mark.integration
def test_the_local_walkthrough_runs_an_authenticated_job_and_fetches_its_results():
    """The script as a user runs it (HOME without a token, the environment's bin first on PATH), with
    ports and a temp dir of its own: it makes the token, refuses a client without it, runs the job
    from the uploaded working dir, follows its logs and reads the run back; then nothing of its head
    is left running."""
    pytest.importorskip("ray.dashboard.optional_deps", reason="the job server needs ray[default]")
    scratch = Path(tempfile.mkdtemp(prefix="rjw-", dir="/tmp"))  # short: the head's socket paths live under it
    home, runs, job_id = scratch / "home", scratch / "runs", "walkthrough-test"
    home.mkdir()
    env = {**without_ray_settings(os.environ), "HOME": str(home), "TMPDIR": str(scratch), "RUNS": str(runs),
           "JOB_ID": job_id, "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
           "RAY_START_ARGS": f"--num-cpus=2 --dashboard-agent-listen-port={free_port()} "
                             f"--ray-client-server-port={free_port()}",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    script = subprocess.Popen(["bash", str(WALKTHROUGH), "quickstart", *TINY], cwd=scratch, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            output, _ = script.communicate(timeout=WALKTHROUGH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGTERM)  # the script's trap stops its head
            output, _ = script.communicate(timeout=90)
            pytest.fail(f"the walkthrough ran past {WALKTHROUGH_TIMEOUT_S} s:\n{output[-6000:]}")
        assert script.returncode == 0, output[-6000:]
        assert kill_pids_mentioning(str(scratch)) == []  # the script stopped everything its head started

        token = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert "Authentication required: Unauthorized: Missing authentication token" in output
        run_dir = runs / "quickstart"
        assert f"Running 'quickstart' in {run_dir}: 1 method(s) x 2 step(s)" in output  # from the followed log
        assert "Verdicts on every metric" in output and "\nindependent " in output  # the run's summary
        assert f"Job '{job_id}' succeeded" in output
        assert f"Report written to {run_dir / 'report.md'}" in output
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert list(metrics["methods"]) == ["independent"]
        assert metrics["methods"]["independent"]["num_versions"] == 2
    finally:
        kill_pids_mentioning(str(scratch))
        subprocess.run(["rm", "-rf", str(scratch)], check=False)


# -- relative run locations inside a job -----------------------------------------------------------
def test_the_job_config_variable_is_the_one_ray_sets():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert cli.RAY_JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR


def in_a_job(monkeypatch, working_dir: str | None) -> None:
    """This process's environment as Ray's job supervisor sets it for an entrypoint."""
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    monkeypatch.setenv(cli.RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


@pytest.mark.parametrize("command, message", [
    (["run", "quickstart", "--output-dir", "runs"], "config key 'output_dir': 'runs' is relative"),
    (["run", "quickstart"], "config key 'output_dir': 'runs' is relative"),  # the config's own output_dir
    (["sweep", "configs/sweep_bct_synthetic.yaml", "--output-dir", "sweeps"],
     "config key 'sweep.output_dir': 'sweeps' is relative"),
])
def test_a_job_with_a_working_dir_refuses_a_relative_run_location(command, message, monkeypatch, tmp_path, capsys):
    in_a_job(monkeypatch, "gcs://_ray_pkg_0123456789abcdef.zip")
    monkeypatch.chdir(tmp_path)
    if command[0] == "sweep":
        command[1] = str(ROOT / command[1])
    assert cli.main(command) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("working_dir, location", [
    ("gcs://_ray_pkg_0123456789abcdef.zip", "/mnt/shared/runs"),
    ("gcs://_ray_pkg_0123456789abcdef.zip", "~/runs"),
    ("gcs://_ray_pkg_0123456789abcdef.zip", "s3://bucket/runs"),
    (None, "runs"),  # no --working-dir: the entrypoint runs where the head was started
])
def test_run_locations_that_outlive_the_job_pass(working_dir, location, monkeypatch):
    in_a_job(monkeypatch, working_dir)
    cli.refuse_a_run_in_the_jobs_copy("output_dir", location)


def test_outside_a_job_a_relative_run_location_passes(monkeypatch):
    monkeypatch.delenv(cli.RAY_JOB_CONFIG_ENV, raising=False)
    cli.refuse_a_run_in_the_jobs_copy("output_dir", "runs")
