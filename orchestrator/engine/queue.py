"""Which worker group trains which task next: the scheduling state of one execution.

Worker groups pull tasks: a group asks for its next task (``claim``) whenever it is free, and the queue
hands it a ready task of its resource shape, preferring the next task of the chain the group just
worked on (its datasets and method are already loaded), or, ``step_by_step``, the ready task of the
lowest step (a sweep's trial: every seed's step k before any seed's step k+1 when its groups are fewer
than its seeds, so the scheduler judges the trial after its first steps). A group with nothing ready
waits while some task of its shape is about to become ready (a task it depends on is running), and
leaves otherwise, so an idle group never holds resources another shape needs. A cancelled queue
answers every claim with DONE and hands the driver the workers to end.

Every rank of a group asks with the same sequence number and gets the same answer; a group that Ray
Train restarts after a failure asks again from sequence 0 and is handed its earlier tasks again (the
finished ones it skips, the interrupted one it redoes); its rank 0 first asks for the number of its
attempt (``start_attempt``), which fences the replaced group's writes. The queue is plain Python: the driver holds it
as a Ray actor when workers run on a cluster, and as an object when the one group trains in-process.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.engine.graph import Task

WAIT, DONE = "wait", "done"


@dataclass
class _Group:
    shape: tuple
    claims: list  # task ids (or DONE) by sequence number
    working: Optional[str] = None
    last: Optional[str] = None  # the last task it claimed: its chain comes first
    open: bool = True
    workers: list = field(default_factory=list)  # the actor handles of its workers on the cluster
    attempts: int = 0  # how many times its workers started (Ray Train restarts a failed group)


class TaskQueue:
    def __init__(self, tasks: list[Task], done: set[str], reuse_groups: bool = True, step_by_step: bool = False):
        self.reuse_groups = reuse_groups  # False: every group trains one task and leaves
        self.step_by_step = step_by_step  # True: the lowest step first, whatever chain the group was on
        self.tasks = {t.id: t for t in tasks}
        self.order = {t.id: i for i, t in enumerate(tasks)}
        self.done = set(done) & set(self.tasks)
        self.failed: dict[str, str] = {}  # task id -> why (its own failure, or the task it depended on)
        self.claimed: dict[str, str] = {}  # task id -> group
        self.groups: dict[str, _Group] = {}
        self.events: list[tuple[str, str]] = []  # ("started" | "finished" | "failed", task id), in order
        self.cancelled = False
        self._ids = itertools.count()

    # -- groups -------------------------------------------------------------------------------
    def open_group(self, shape: tuple) -> str:
        name = f"group-{next(self._ids)}"
        self.groups[name] = _Group(shape=shape, claims=[])
        return name

    def join(self, group: str, worker) -> None:
        self.groups[group].workers.append(worker)

    def start_attempt(self, group: str) -> int:
        """The number of the attempt the group's rank 0 is starting: 1, then one more at every restart
        (the order of these calls orders the attempts; see orchestrator/storage/attempts.py)."""
        g = self.groups[group]
        g.attempts += 1
        return g.attempts

    def cancel(self) -> list:
        """From now on every claim is DONE and no group is wanted; returns the open groups' workers."""
        self.cancelled = True
        return [w for g in self.groups.values() if g.open for w in g.workers]

    def close_group(self, group: str, error: Optional[str] = None) -> None:
        """The group's Train run ended. A task it was still on failed (with ``error``, or without a word),
        and so does every task that depends on it; other chains go on. A group that failed before it
        took any task (its workers cannot start, or cannot see the run) fails every task of its shape
        that no group holds: the next group of that shape would only fail the same way."""
        g = self.groups[group]
        g.open = False
        if g.working is not None and g.working not in self.done:
            self._fail(g.working, error or "its worker group ended without finishing it")
        elif error is not None and not g.claims:
            for t in list(self.tasks.values()):
                if shape_of(t) == g.shape and t.id not in self.done and t.id not in self.failed and t.id not in self.claimed:
                    self._fail(t.id, f"a worker group for it failed before it took a task: {error}")
        g.working = None

    def claim(self, group: str, seq: int) -> str:
        """The task id for the group's ``seq``-th claim, ``WAIT`` (ask again soon) or ``DONE`` (leave)."""
        g = self.groups[group]
        if self.cancelled:
            return DONE
        if seq < len(g.claims):  # a rank catching up, or a restarted group replaying its claims
            answer = g.claims[seq]
            if answer != DONE:
                g.working = answer
            return answer
        may_take = self.reuse_groups or not g.claims
        pick = self._pick(g) if may_take else None
        if pick is None:
            if may_take and self._worth_waiting(g.shape):
                return WAIT
            g.claims.append(DONE)
            return DONE
        g.claims.append(pick)
        g.working, g.last = pick, pick
        self.claimed[pick] = group
        self.events.append(("started", pick))
        return pick

    def complete(self, task_id: str) -> None:
        """``task_id`` is committed (its manifest entry exists)."""
        if task_id not in self.done:
            self.done.add(task_id)
            self.events.append(("finished", task_id))
        for g in self.groups.values():
            if g.working == task_id:
                g.working = None

    # -- what the driver reads ------------------------------------------------------------------
    def demand(self) -> dict[tuple, int]:
        """Worker groups worth having, by resource shape: one per chain with a task that is ready or about
        to be (everything it needs is finished or running), unless a group is on that chain already. A
        group opened for a task that is about to be ready starts while that task's dependency trains."""
        if self.cancelled:
            return {}
        running = {g.working for g in self.groups.values() if g.open and g.working is not None}
        busy_chains = {self.tasks[t].chain for t in running}
        chains: dict[tuple, set[str]] = {}
        for t in self.tasks.values():
            if (t.id in self.done or t.id in self.failed or t.id in self.claimed or t.chain in busy_chains
                    or not all(d in self.done or d in running for d in t.deps)):
                continue
            chains.setdefault(shape_of(t), set()).add(t.chain)
        return {shape: len(names) for shape, names in chains.items()}

    def free_groups(self) -> dict[tuple, int]:
        """Open groups not working on a task (starting, or between tasks), by resource shape."""
        counts: dict[tuple, int] = {}
        for g in self.groups.values():
            if g.open and g.working is None:
                counts[g.shape] = counts.get(g.shape, 0) + 1
        return counts

    def open_groups(self) -> list[tuple]:
        return [g.shape for g in self.groups.values() if g.open]

    def running(self) -> list[str]:
        return [g.working for g in self.groups.values() if g.open and g.working is not None]

    def events_since(self, cursor: int) -> list[tuple[str, str]]:
        return self.events[cursor:]

    def finished(self) -> bool:
        """Every task committed, or failed, or blocked by a failure."""
        return all(t in self.done or t in self.failed for t in self.tasks)

    def failures(self) -> dict[str, str]:
        return dict(self.failed)

    # -- internals ---------------------------------------------------------------------------------
    def _ready(self) -> list[Task]:
        return [t for t in self.tasks.values()
                if t.id not in self.done and t.id not in self.failed and t.id not in self.claimed
                and all(d in self.done for d in t.deps)]

    def _pick(self, g: _Group) -> Optional[str]:
        ready = [t for t in self._ready() if shape_of(t) == g.shape]
        if not ready:
            return None
        if self.step_by_step:
            return min(ready, key=lambda t: (-1 if t.step is None else t.step, self.order[t.id])).id
        last = self.tasks.get(g.last) if g.last else None
        same_chain = [t for t in ready if last is not None and t.chain == last.chain]
        return (same_chain or ready)[0].id  # otherwise the first in plan order

    def _worth_waiting(self, shape: tuple) -> bool:
        """Some pending task of ``shape`` needs only tasks that are finished, running, or ready for a group
        that is between tasks right now (it claims one at once: a group that just committed a step is
        about to take the next, and a group waiting for that next step must not leave meanwhile)."""
        running = {g.working for g in self.groups.values() if g.open and g.working is not None}
        between = {g.shape for g in self.groups.values()
                   if g.open and g.working is None and g.claims and g.claims[-1] != DONE}
        soon = running | {t.id for t in self._ready() if shape_of(t) in between}
        for t in self.tasks.values():
            if (shape_of(t) == shape and t.id not in self.done and t.id not in self.failed
                    and t.id not in self.claimed and all(d in self.done or d in soon for d in t.deps)):
                return True
        return False

    def _fail(self, task_id: str, why: str) -> None:
        self.failed[task_id] = why
        self.events.append(("failed", task_id))
        for t in self.tasks.values():  # in plan order, so dependents of dependents follow
            if t.id not in self.failed and t.id not in self.done and any(d in self.failed for d in t.deps):
                self.failed[t.id] = f"needs {task_id}, which failed"


def shape_of(task: Task) -> tuple:
    r = task.resources
    return (r.num_workers, r.use_gpu, r.cpus_per_worker)

