"""Helpers shared by test modules (pytest puts this directory on sys.path)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from orchestrator.config import ExperimentConfig
from orchestrator import load_config


def config_under(directory, *overrides: str) -> ExperimentConfig:
    """The built-in quickstart with ``overrides``, its run directory under ``directory``."""
    return load_config(None, [*overrides, f"output_dir={directory}"])


def stop_ray_head(head: subprocess.Popen) -> None:
    """Stop a ``ray start --head --block`` process started in a session of its own, and everything it
    started: SIGTERM (``--block`` stops its processes), then SIGKILL to that session only."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def free_port() -> int:
    """A loopback port nothing listens on now: each test head gets its own (other clusters may share the machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (Linux /proc; empty elsewhere)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return found


def kill_pids_mentioning(text: str) -> list[int]:
    """SIGKILL every process whose command line contains ``text`` (a test head's own temp dir); returns them."""
    pids = pids_mentioning(text)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def without_ray_settings(environ) -> dict:
    """``environ`` minus anything that points a Ray process at a cluster or a token."""
    return {k: v for k, v in environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# A two-step run on one Train worker, small enough for tests that launch `compat run` as a job.
TINY_WORKER_RUN = [
    "data.num_classes=4", "data.train_per_class=16", "data.test_per_class=4",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
    "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.incremental={}", "training.batch_size=16",
    "resources.num_workers=1", "methods=[{name: independent}]",
]
