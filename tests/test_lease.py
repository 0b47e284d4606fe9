"""One driver at a time: a run's lease (orchestrator/storage/lease.py) with real processes.

A second ``compat run`` on a live run refuses and names the holder; after the holder is SIGKILLed,
``--resume`` takes over once the lease has expired. A driver stalled by SIGSTOP is taken over, and then
neither it nor a worker holding its storage handle can write anything into the run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from methods.base import EXTRA_METHOD_MODULES_ENV, register
from methods.independent import Independent
from orchestrator.cli import main
from orchestrator.errors import RunError
from orchestrator.storage import runfiles
from orchestrator.storage.lease import EXPIRY_ENV, Fence, RunLease, lease_expiry_s, read_lease
from orchestrator.storage.run_storage import RunStorage
from test_run_storage import memory_storage

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class HeldParams:
    hold: str = ""  # while this file exists, the first training batch waits (and says so next to it)


@register
class HeldIndependent(Independent):
    """``independent`` whose first batch waits while a hold file exists: a driver that stays busy as long
    as the test needs, without using a CPU."""

    name = "test_held"
    Params = HeldParams

    def after_backward(self, model, state, ctx):
        hold = Path(self.params.hold)
        if hold.exists():
            (hold.parent / "holding").touch()
            deadline = time.time() + 300  # never hang a broken test forever
            while hold.exists() and time.time() < deadline:
                time.sleep(0.05)


def env_for_children(**extra: str) -> dict:
    """This test session's environment, with this worktree and tests/ importable and this module's method registered."""
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, EXTRA_METHOD_MODULES_ENV: __name__, "OMP_NUM_THREADS": "1", **extra}


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def sleep_until_expired(run: RunStorage) -> None:
    record = read_lease(run)
    time.sleep(max(0.0, record["heartbeat_at"] + record["expiry_s"] - time.time()) + 0.1)


def held_run_args(tmp_path: Path) -> list[str]:
    """`compat run` arguments of a one-step run whose training waits while ``tmp_path/hold`` exists."""
    overrides = ["data.num_classes=4", "data.train_per_class=8", "data.test_per_class=4",
                 "scenario.initial_classes=4", "scenario.num_steps=1", "model.width=8", "model.embedding_dim=16",
                 "training.epochs=1", "training.batch_size=16", "resources.num_workers=0",
                 f"methods=[{{name: test_held, params: {{hold: '{tmp_path / 'hold'}'}}}}]"]
    return ["run", "--no-progress", "--output-dir", str(tmp_path / "runs"), *[a for o in overrides for a in ("--set", o)]]


def start_held_driver(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    """``compat run`` in a process of its own (lease expiry 6 s), returned once it holds the lease and trains."""
    (tmp_path / "hold").touch()
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                                  env=env_for_children(**{EXPIRY_ENV: "6"}), stdout=sink, stderr=subprocess.STDOUT)
    wait_for(lambda: (tmp_path / "holding").exists() or driver.poll() is not None, "the driver to train")
    if driver.poll() is not None:
        pytest.fail(log.read_text())
    return driver


def test_a_second_driver_refuses_and_resume_takes_over_once_the_killed_holders_lease_expires(tmp_path, capsys):
    args, hold = held_run_args(tmp_path), tmp_path / "hold"
    run_dir = tmp_path / "runs" / "quickstart"
    run = RunStorage.at(run_dir)
    first = start_held_driver(tmp_path, args)
    try:
        held = read_lease(run)
        assert (held["pid"], held["host"], held["generation"]) == (first.pid, socket.gethostname(), 1)

        # a second driver of the same config, and a --resume, both refuse at once and name the holder
        for second in (args, ["run", "--resume", str(run_dir), "--no-progress"]):
            assert main(second) == 2
            err = capsys.readouterr().err
            assert f"is being run by another driver: pid {first.pid} on host {socket.gethostname()}" in err
            assert f"compat run --resume {run_dir}" in err
        assert {k: read_lease(run)[k] for k in ("holder", "generation")} == {k: held[k] for k in ("holder", "generation")}
        assert not runfiles.step_done(run, "test_held", 0)

        first.send_signal(signal.SIGKILL)  # no release: the lease stays until it expires
        first.wait()
        hold.unlink()
        assert read_lease(run)["released_at"] is None
        sleep_until_expired(run)
        assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    finally:
        first.kill()
        first.wait()
    assert runfiles.step_done(run, "test_held", 0) and run.exists(runfiles.METRICS)
    after = read_lease(run)
    assert (after["pid"], after["generation"]) == (os.getpid(), 2) and after["released_at"] is not None


def test_sigterm_releases_the_lease(tmp_path):
    """kill, `ray job stop` and a pod's shutdown send SIGTERM: the driver lets go at once."""
    run = RunStorage.at(tmp_path / "runs" / "quickstart")
    driver = start_held_driver(tmp_path, held_run_args(tmp_path))
    try:
        driver.send_signal(signal.SIGTERM)
        wait_for(lambda: read_lease(run)["released_at"] is not None, "the lease to be released")
        (tmp_path / "hold").unlink()  # the training thread may go on; it can write nothing more
        assert driver.wait(timeout=120) != 0
    finally:
        driver.kill()
        driver.wait()
    assert read_lease(run)["pid"] == driver.pid and not runfiles.step_done(run, "test_held", 0)


HOLDER = """
import sys, time
from orchestrator.storage.lease import RunLease
from orchestrator.storage.run_storage import RunStorage

run = RunStorage.at(sys.argv[1])
lease = RunLease.take(run, expiry_s=float(sys.argv[2]))
print("held", flush=True)
sys.stdin.readline()  # the test stops this process here, takes the lease over, continues it and asks
deadline = time.time() + 60
while lease.lost is None and time.time() < deadline:
    time.sleep(0.05)
print("lost" if lease.lost is not None else "not lost", flush=True)
try:
    lease.guard(run).write_json("late.json", {})
    print("wrote", flush=True)
except Exception as exc:
    print("refused:", exc, flush=True)
"""


def test_a_stalled_driver_and_its_workers_write_nothing_once_another_driver_took_over(tmp_path):
    run = RunStorage.at(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run.root, "3"], env=env_for_children(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        first = read_lease(run)
        # a driver that waits for a gone holder refuses a live one as soon as its heartbeat moves
        with pytest.raises(RunError, match=f"pid {holder.pid} on host"):
            RunLease.take(run, wait=True)
        # a worker of the first driver, with the storage handle its driver gave it, commits as usual
        worker = run.fenced(Fence(run, first["holder"], first["generation"]))
        runfiles.mark_step_done(worker, "bct", 0, {"version": 0})
        assert runfiles.step_done(run, "bct", 0)

        # the driver stalls right after a heartbeat; a waiting driver takes the lease once it expires
        beat = read_lease(run)["heartbeat_at"]
        wait_for(lambda: read_lease(run)["heartbeat_at"] > beat, "a heartbeat")
        os.kill(holder.pid, signal.SIGSTOP)
        with RunLease.take(run, wait=True) as second:
            assert second.record["generation"] == 2
            for write in (lambda: runfiles.mark_step_done(worker, "bct", 1, {"version": 1}),
                          lambda: runfiles.save_epoch_state(worker, "bct", 1, {"epoch": 0}),
                          lambda: runfiles.clear_epoch_state(worker, "bct", 0),
                          lambda: runfiles.write_row(worker.child("seed-0"), "bct", 1, {})):
                with pytest.raises(RunError, match=f"no longer holds the lease.*pid {os.getpid()} on host"):
                    write()
            assert not runfiles.step_done(run, "bct", 1) and not run.list("epochs") and not run.list("seed-0")

            # the stalled driver wakes: its heartbeat finds the new holder and its own writes are refused
            os.kill(holder.pid, signal.SIGCONT)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "lost"
            assert holder.stdout.readline().startswith("refused: this driver (lease generation 1) no longer holds")
            assert not run.exists("late.json") and read_lease(run)["holder"] == second.fence.holder
            runfiles.mark_step_done(second.guard(run), "bct", 1, {"version": 1})  # the new holder's work goes on
        assert runfiles.step_done(run, "bct", 1) and read_lease(run)["released_at"] is not None
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()


@pytest.fixture(params=["local", "memory"])
def run(request, tmp_path):
    return RunStorage.at(tmp_path / "run") if request.param == "local" else memory_storage()


def test_heartbeat_release_and_generations(run):
    with RunLease.take(run, expiry_s=30) as lease:
        record = read_lease(run)
        assert record == lease.record and record["generation"] == 1 and record["released_at"] is None
        assert (record["pid"], record["host"], record["expiry_s"]) == (os.getpid(), socket.gethostname(), 30)
        with pytest.raises(RunError, match=f"pid {os.getpid()} on host .*lease generation 1"):
            RunLease.take(run)
        time.sleep(0.01)
        assert lease.heartbeat() and read_lease(run)["heartbeat_at"] > record["heartbeat_at"]
        lease.guard(run).child("manifest").write_json("task.json", {})  # children carry the fence
    assert read_lease(run)["released_at"] is not None
    with pytest.raises(RunError, match="this driver has released it"):
        lease.guard(run).write_json("after.json", {})
    with RunLease.take(run, expiry_s=30) as again:  # a released lease is free at once; generations go on
        assert again.record["generation"] == 2
    assert run.list() == ["lease.json", "manifest/task.json"]


def test_an_error_inside_the_run_still_releases_the_lease(run):
    with pytest.raises(KeyboardInterrupt):
        with RunLease.take(run, expiry_s=30):
            raise KeyboardInterrupt
    assert read_lease(run)["released_at"] is not None


def test_expiry_setting(monkeypatch):
    monkeypatch.setenv(EXPIRY_ENV, "2.5")
    assert lease_expiry_s() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(EXPIRY_ENV, bad)
        with pytest.raises(RunError, match=EXPIRY_ENV):
            lease_expiry_s()
    monkeypatch.delenv(EXPIRY_ENV)
    assert lease_expiry_s() == 60.0
