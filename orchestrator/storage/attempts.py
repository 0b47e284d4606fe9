"""One attempt of a worker group at a time: the fence that shuts out a replaced group of the same driver.

The lease (orchestrator/storage/lease.py) fences the workers of a *former driver*. When Ray Train
restarts a worker group of the *same* driver (a worker died, its node was lost; ``max_failures``), the
replaced group's workers carry the same lease: a worker on a node that is cut off rather than dead (a
network partition, a hung process) could wake up and write an epoch checkpoint, store shards, weights
or a manifest entry beside the new group. So every start of a group is an *attempt*, and its writes are
fenced by it as well:

- **numbering**: each execution of a task graph (:func:`~orchestrator.engine.executor.execute`) keeps
  its attempt records under a prefix of its own, ``attempts/<execution>/<group>/``; the execution's task
  queue numbers the starts of each group 1, 2, ... in the order they ask (a restarted group asks when
  its workers start again), so a higher number is a later start.
- **start**: the group's rank 0 gets the next number from the queue, writes the attempt's record
  ``attempt-NNNN.json`` (its host, pid and start time) through the lease-fenced storage, and hands the
  number to the other ranks of the group (a broadcast in the group's own process group, so a worker of
  an older group can never learn a newer number).
- **fence**: the storage the group's workers write through carries an :class:`AttemptFence`. Every
  write and delete first checks the lease (as before), then lists the group's records and refuses unless
  its own record is there and none with a higher number: once a newer attempt has started, the older
  one writes nothing more, and its worker fails with a RunError that names the attempt that replaced it.
- **end**: the execution deletes its prefix when it ends (tidiness; a leftover worker of it then finds
  its own record gone and is refused too). A new driver (``--resume``) runs new executions, with new
  prefixes, and its former holder's workers are refused by the lease.

Each record is written once under its own key (no overwrite, no read-back needed): the check sees a
newer attempt as soon as its record exists, on any storage whose listing shows a finished write (local
disks, S3, GCS). What remains, honestly:

- as with the lease, a check and the write it guards are two operations: a write that passed its check
  just before the new group started can land just after;
- a worker of a replaced group that stalled before it asked the queue for its number (the very first
  thing a group does) and wakes after the new group started gets the higher number: it becomes the
  current attempt and the new group is refused instead (Ray counts a failure). Either way one attempt
  at a time writes, and the one that commits a task wrote every artefact its manifest entry vouches for.

The check costs one listing of a directory holding a record or two, next to the lease's one read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from orchestrator.errors import RunError
from orchestrator.storage.run_storage import RunStorage

ATTEMPTS = "attempts"
_RECORD = re.compile(r"attempt-(\d+)\.json")


def new_execution() -> str:
    """The prefix (relative to the run) under which one execution of a task graph keeps its attempt records."""
    return f"{ATTEMPTS}/{uuid.uuid4().hex[:16]}"


def record_key(number: int) -> str:
    return f"attempt-{number:04d}.json"


@dataclass(frozen=True)
class AttemptFence:
    """What the storage of one attempt of a worker group carries: the lease's fence (None for a run not
    written under a lease) and where the group's attempt records are. See the module docstring."""

    lease: Optional[Any]  # orchestrator.storage.lease.Fence
    records: RunStorage  # the group's record directory (unfenced)
    group: str
    number: int

    def numbers(self) -> list[int]:
        """The numbers of the group's attempts that have started, in order."""
        return sorted(int(m.group(1)) for key in self.records.list(recursive=False)
                      if (m := _RECORD.fullmatch(key)) is not None)

    def check(self) -> None:
        """Nothing when the lease holds and no newer attempt of the group has started; else a RunError that says why."""
        if self.lease is not None:
            self.lease.check()
        numbers = self.numbers()
        if numbers and numbers[-1] == self.number:
            return
        if numbers and numbers[-1] > self.number:
            newer = self.records.read_json_or_none(record_key(numbers[-1])) or {}
            why = (f"worker group {self.group} was started again: attempt {numbers[-1]} ({describe(newer)}) "
                   f"replaced attempt {self.number}, which this worker belongs to")
        else:
            why = (f"the record of attempt {self.number} of worker group {self.group} is gone from "
                   f"{self.records.location} (the driver's execution of the task graph ended)")
        raise RunError(f"{why}; this worker (pid {os.getpid()} on host {socket.gethostname()}) writes nothing "
                       f"more to the run")


def describe(record: dict) -> str:
    started = record.get("started_at")
    clock = "at an unknown time" if started is None else \
        datetime.fromtimestamp(started).isoformat(sep=" ", timespec="seconds")
    return f"pid {record.get('pid')} on host {record.get('host')}, started {clock}"


def start(root: RunStorage, prefix: str, group: str, number: int) -> RunStorage:
    """Rank 0's start of attempt ``number`` of ``group``: write its record, and return ``root`` fenced by
    the attempt. Refuses at once when a newer attempt started before this one wrote its record."""
    storage = root.fenced(fence_of(root, prefix, group, number).lease)  # the record's write: the lease alone
    storage.write_json(f"{prefix}/{group}/{record_key(number)}", {
        "group": group, "attempt": number, "host": socket.gethostname(), "pid": os.getpid(),
        "started_at": time.time()})
    return joined(root, prefix, group, number)


def joined(root: RunStorage, prefix: str, group: str, number: int) -> RunStorage:
    """``root`` (a worker's lease-fenced storage) fenced by attempt ``number`` of ``group`` as well;
    checked once here, so a worker of a replaced group stops before it does anything."""
    fence = fence_of(root, prefix, group, number)
    fence.check()
    return root.fenced(fence)


def fence_of(root: RunStorage, prefix: str, group: str, number: int) -> AttemptFence:
    lease = root.fence.lease if isinstance(root.fence, AttemptFence) else root.fence
    return AttemptFence(lease, root.fenced(None).child(f"{prefix}/{group}"), group, number)


def end(root: RunStorage, prefix: str) -> None:
    """Delete an execution's attempt records (tidiness: nothing reads them once it ended)."""
    try:
        root.delete_all(prefix)
    except (OSError, RunError):
        return  # a lost lease or a storage hiccup: the records are a few bytes, and a new execution has a new prefix
    if root.is_local:  # a disk keeps the emptied directories (an object store has none)
        shutil.rmtree(root.local_path(prefix), ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: another execution's records are still there
            root.local_path(ATTEMPTS).rmdir()
