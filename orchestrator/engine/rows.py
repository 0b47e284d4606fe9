"""Matrix rows near the data: each version's row of every compatibility matrix, as a Ray task.

When a version trained on the cluster commits, its row is submitted as a Ray task that reads the run
storage (the store's vectors, the older rows' top-1 correctness) and writes the row file there; it runs
while later versions train. It reads nothing else: the one fact of the dataset a row needs (its number
of classes, for the class blocks) comes from the driver's plan, so the task may run on a node that cannot
read the training data. The driver only learns which rows are ready; metrics.json is assembled
from the row files at the end. A version trained in-process (``num_workers: 0``) keeps its row in the
driver. Either way the row is :func:`orchestrator.engine.driver.ensure_row`'s: the same function, the
same bits, written once.

Row t's negative flips need rows 0..t-1, so a method's row tasks form a chain (each waits for the one
before); rows of different methods and seeds run side by side.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

from orchestrator.storage.run_storage import RunStorage

# One CPU per row: the ranking is CPU-bound (matmul, sort), so a fraction would let Ray pack rows onto
# cores the worker groups hold and slow both; a whole CPU keeps Ray's accounting honest.
ROW_CPUS = 1.0


def compute_row(config: dict, run: RunStorage, method: str, version: int, num_classes: int, *earlier_rows) -> str:
    """The row task's body (``earlier_rows``: the chain's previous row task, only to order them)."""
    from orchestrator.config.crossmodal import parse_any
    from orchestrator.engine.driver import ensure_row

    ensure_row(parse_any(config), run, method, version, num_classes)
    return f"{method}/{version}"


@lru_cache(maxsize=None)
def _remote_row():
    """Outside any placement group: a sweep trial's driver runs in one whose bundle holds no CPU for rows."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(compute_row).options(num_cpus=ROW_CPUS, max_retries=1,
                                           scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


class RowTasks:
    """Where each finished version's row is computed: a Ray task when it trained on the cluster, else
    here, at once. ``on_row(task_id)`` follows each row that is ready (the trackers)."""

    def __init__(self, graph, root: RunStorage, on_row: Callable[[str], None]):
        self.graph, self.root, self.on_row = graph, root, on_row
        self.pending: dict = {}  # ObjectRef -> task id
        self.last_of_chain: dict[str, object] = {}  # chain -> its newest row task's ObjectRef

    def submit(self, task_id: str) -> None:
        from orchestrator.engine.driver import ensure_row

        task = self.graph.tasks[task_id]
        if task.method is None:
            return  # the upstream CLIP: no version of a method
        run = self.graph.runs[task.run]
        method = run.config.methods[task.method].key
        earlier = self.last_of_chain.get(task.chain)
        if task.resources.num_workers == 0:
            if earlier is not None:
                self._wait([earlier])
            ensure_row(run.config, self.root.child(task.run), method, task.step, run.num_classes)
            self.on_row(task_id)
            return
        ref = _remote_row().remote(run.config.to_dict(), self.root.child(task.run), method, task.step,
                                   run.num_classes, *([] if earlier is None else [earlier]))
        self.pending[ref] = task_id
        self.last_of_chain[task.chain] = ref
        self.collect(timeout=0)

    def collect(self, timeout: Optional[float] = None) -> None:
        """Hand the rows that are ready to ``on_row`` (with ``timeout=None``, wait for all); a failed
        row task raises its error here."""
        import ray

        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending) if timeout is None else 1,
                            timeout=timeout)
        while ready:
            self._wait(ready)
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0) if self.pending else ([], [])

    def _wait(self, refs: list) -> None:
        import ray

        for ref in refs:
            ray.get(ref)
            task_id = self.pending.pop(ref, None)
            if task_id is not None:
                self.on_row(task_id)

    def cancel(self) -> None:
        """A failed or cancelled run: its row tasks stop (a row written is whole; a missing one is computed on resume)."""
        import ray

        for ref in self.pending:
            ray.cancel(ref)
        self.pending.clear()
