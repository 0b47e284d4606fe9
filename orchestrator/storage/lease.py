"""One driver at a time: a run's lease, kept alive by a heartbeat, and the fence that shuts out a former holder.

A driver (``compat run``, ``--resume``, a sweep trial's simulation) holds its run's lease, the object
``lease.json`` at the top of the run, from before its first write until its last. The record names the
holder (a random token, host, pid, start time), the time of its last heartbeat, the expiry it promises
(how long without a heartbeat before others may call it gone) and a generation number that grows by
one with every new holder. Seeds and upstream models live inside the run and share its one lease; each
sweep trial's run has a lease of its own.

Only whole-object writes and reads are used, because that is all an object store keeps (no rename, no
append, no conditional write, no lock service):

- **take**: read the record. A live one (not released, heartbeat younger than its expiry) held by
  someone else is refused, naming the holder. Otherwise write a record with a fresh token and the next
  generation, wait ``settle`` seconds, read it back: our token means we hold it; another token means a
  driver that started at the same moment won, and we refuse.
- **heartbeat** (a driver thread, every expiry/4): read the record; while it still names us, rewrite it
  with the current time; once it names someone else, stop: the lease is lost.
- **release** (at the end, also after an error or Ctrl-C): rewrite our record marked released. The
  record stays, so generations keep counting up.
- **fence**: the driver's storage handle, and with it every worker's (they receive it in their loop
  config), carries the holder's token and generation. Every write and delete through it first reads the
  record and refuses unless the record still names that holder and generation, unreleased. A dead
  driver's workers, and a driver that stalled past its expiry and was taken over, can no longer commit
  a task, save weights, write the store or the epoch checkpoints. (A worker group that Ray Train
  restarts under the *same* driver carries the same lease; orchestrator/storage/attempts.py fences the
  group it replaced.)

The race windows, honestly:

- A check and the write it guards are two operations: a write that passed its check a moment before a
  takeover can still land after it. Takeovers happen only after a whole expiry (default 60 s) without a
  heartbeat, far longer than a dead driver's workers linger (a second or two), so this needs a holder
  that stalled for the expiry and woke up exactly during the takeover.
- Two drivers taking a free or expired lease at the same moment: both read back after ``settle``; both
  can believe they won only if one of them was paused between its read and its write for longer than
  ``settle``. The record then names the last writer, so the other one's fence refuses its first write
  and its heartbeat gives up.
- A heartbeat is a read then a write: a takeover that lands between the two is overwritten, and the
  taker learns at its own next heartbeat or write that it lost (one of the two goes on, never both).
- Liveness compares the holder's clock (the heartbeat time) with the reader's, so the hosts' clocks must
  agree to well within the expiry (NTP does). Waiting takers (``wait=True``) also call a lease gone once
  they have watched it unchanged for a whole expiry on their own clock, which needs no agreement.

``COMPAT_LEASE_EXPIRY_S`` sets the expiry a driver promises (default 60 s; the tests use a few seconds).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from orchestrator.errors import RunError
from orchestrator.storage.run_storage import RunStorage

LEASE = "lease.json"
EXPIRY_ENV = "COMPAT_LEASE_EXPIRY_S"
DEFAULT_EXPIRY_S = 60.0
SETTLE_S = 0.2  # between writing a new record and reading it back (capped at a tenth of the expiry)


def lease_expiry_s() -> float:
    """The expiry this process promises when it takes a lease: ``COMPAT_LEASE_EXPIRY_S``, default 60 s."""
    raw = os.environ.get(EXPIRY_ENV)
    if raw is None:
        return DEFAULT_EXPIRY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise RunError(f"{EXPIRY_ENV}={raw!r} must be a positive number of seconds")
    return value


def read_lease(run: RunStorage) -> Optional[dict]:
    """The run's lease record as stored, None when no driver ever held it."""
    return run.read_json_or_none(LEASE)


def is_live(record: Optional[dict], now: Optional[float] = None) -> bool:
    """Whether ``record`` is held: not released, and heartbeating within its expiry."""
    if record is None or record.get("released_at") is not None:
        return False
    return (time.time() if now is None else now) - record["heartbeat_at"] < record["expiry_s"]


@dataclass(frozen=True)
class Fence:
    """What a holder's storage handle carries: the lease it writes under. See the module docstring."""

    lease: RunStorage  # the run whose top holds lease.json (unfenced)
    holder: str
    generation: int

    def check(self) -> None:
        """Nothing when the lease still names this holder and generation, else the RunError that says who has it."""
        record = read_lease(self.lease)
        if (record is not None and record.get("holder") == self.holder and record.get("generation") == self.generation
                and record.get("released_at") is None):
            return
        if record is None:
            why = f"its {LEASE} is gone"
        elif record.get("holder") == self.holder:
            why = "this driver has released it"
        else:
            why = f"{describe_holder(record)} took it over (generation {record.get('generation')})"
        raise RunError(f"this driver (lease generation {self.generation}) no longer holds the lease of "
                       f"{self.lease.location}: {why}; it writes nothing more there")


def describe_holder(record: dict) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')}, started {_clock(record.get('started_at'))}"


def _clock(stamp: Optional[float]) -> str:
    return "at an unknown time" if stamp is None else datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


def held_error(run: RunStorage, record: dict, now: float) -> RunError:
    age = now - record["heartbeat_at"]
    left = max(record["expiry_s"] - age, 0.0)
    return RunError(
        f"{run.location} is being run by another driver: {describe_holder(record)}, last heartbeat {age:.0f} s "
        f"ago (lease generation {record.get('generation')}). Only one driver may work in a run. If that driver "
        f"is still running, let it finish or stop it; if it is gone, its lease expires in {left:.0f} s "
        f"(its expiry is {record['expiry_s']:g} s without a heartbeat): then run `compat run --resume "
        f"{run.location}`")


class RunLease:
    """The lease this process holds on a run, with its heartbeat thread; a context manager that releases it."""

    def __init__(self, run: RunStorage, record: dict):
        self.run = run
        self.record = record
        self.fence = Fence(run, record["holder"], record["generation"])
        self.lost: Optional[dict] = None  # the record that replaced ours, once the heartbeat saw it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="compat-lease-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, run: RunStorage, *, wait: bool = False, expiry_s: Optional[float] = None) -> "RunLease":
        """Take the run's lease, or raise a RunError that names its live holder.

        ``wait``: instead of refusing a live lease at once, watch it; refuse as soon as its heartbeat
        moves (the holder is alive), take it once it expires or stays unchanged for its whole expiry
        (for a sweep trial restarted right after its previous simulation was killed)."""
        run = run.fenced(None)  # the lease's own writes are never fenced
        expiry = expiry_s if expiry_s is not None else lease_expiry_s()
        watched: Optional[tuple] = None  # ((holder, heartbeat), when we first saw it)
        while True:
            current, now = read_lease(run), time.time()
            if is_live(current, now):
                seen = (current.get("holder"), current["heartbeat_at"])
                if not wait or (watched is not None and watched[0] != seen):
                    raise held_error(run, current, now)
                watched = watched or (seen, now)
                if now - watched[1] < current["expiry_s"]:
                    time.sleep(min(1.0, current["expiry_s"] / 8))
                    continue
            record = {"holder": uuid.uuid4().hex, "generation": int((current or {}).get("generation", 0)) + 1,
                      "host": socket.gethostname(), "pid": os.getpid(), "started_at": now, "heartbeat_at": now,
                      "expiry_s": expiry, "released_at": None}
            run.write_json(LEASE, record)
            time.sleep(min(SETTLE_S, expiry / 10))
            back = read_lease(run)
            if back is None or back.get("holder") != record["holder"]:
                raise held_error(run, back or record, time.time())
            return cls(run, record)

    def guard(self, run: RunStorage) -> RunStorage:
        """``run`` (this run or a part of it) with every write fenced by this lease."""
        return run.fenced(self.fence)

    def heartbeat(self) -> bool:
        """Refresh the record; False once it names another holder (``lost`` then holds that record)."""
        current = read_lease(self.run)
        if current is None or current.get("holder") != self.fence.holder or current.get("released_at") is not None:
            self.lost = current or {}
            return False
        self.record = {**self.record, "heartbeat_at": time.time()}
        self.run.write_json(LEASE, self.record)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.record["expiry_s"] / 4):
            try:
                if not self.heartbeat():
                    return
            except (OSError, RunError):  # a storage hiccup: try again; the lease expires if it lasts
                continue

    def release(self) -> None:
        """Stop heartbeating and mark the record released, unless it names someone else by now."""
        self._stop.set()
        self._thread.join()
        current = read_lease(self.run)
        if current is not None and current.get("holder") == self.fence.holder and current.get("released_at") is None:
            self.run.write_json(LEASE, {**current, "released_at": time.time()})

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except (OSError, RunError):
            if exc_type is None:
                raise  # otherwise the error that ended the run is the one to show; the lease expires
