"""The executor: runs every ready task of a graph as soon as the cluster holds its worker group.

Worker groups are Ray Train runs (one ``TorchTrainer.fit`` each, started from a driver thread) whose
workers pull tasks from a :class:`~orchestrator.engine.queue.TaskQueue` until it tells them to leave.
Independent chains therefore train at the same time in groups of their own, while consecutive tasks of
one chain stay in one group and pay its start-up once. The driver only schedules: it opens a group
when a task of some resource shape is ready, no open group of that shape is free and the cluster has
room for it; it learns what finished from the queue, and hands each finished task to ``on_finished``
(the matrix rows) and to the progress display.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Mapping, Optional

from orchestrator.engine.graph import TaskGraph
from orchestrator.engine.queue import DONE, WAIT, TaskQueue
from orchestrator.errors import CompatError, RunCancelled, RunError
from orchestrator.storage.run_storage import RunStorage

DRIVER_RESOURCE = "TRAIN_DRIVER_RESOURCE"  # declared by the deployment files on the head node only
DRIVER_SHARE = 0.01  # of one unit: a node declaring N units hosts up to 100 * N drivers
HEALTH_CHECK_INTERVAL_S = 0.2  # Ray Train's default is 2 s; an environment variable of the same name wins
POLL_S = 0.2
_LOCAL_QUEUES: dict[str, TaskQueue] = {}  # in-process groups find their queue here (no Ray actor needed)


def execute(graph: TaskGraph, root: RunStorage, *, on_finished: Callable[[str], None] = lambda task_id: None,
            display=None, max_groups: Optional[int] = None, step_by_step: bool = False,
            cancel: Optional[threading.Event] = None) -> None:
    """Run every unfinished task of ``graph`` (run state under ``root``); raise the first failure once
    everything that did not depend on it has finished. ``max_groups`` caps the worker groups open at
    once; ``step_by_step`` hands out the lowest ready step first (see :class:`TaskQueue`); once
    ``cancel`` is set, the open groups end at once and :class:`RunCancelled` is raised."""
    from orchestrator.storage import attempts, runfiles

    done = {t.id for t in graph.tasks.values() if runfiles.task_done(root.child(t.run), t.name)}
    todo = [t for t in graph.tasks.values() if t.id not in done]
    if not todo:
        return
    remote = any(t.resources.num_workers > 0 for t in todo)
    streamed = _streams_data(graph)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    if remote or streamed:  # (in-process streaming: else Ray Data would start or join a cluster on its own terms)
        ensure_ray(echo=display.echo if display is not None else print)
    if any(t.resources.num_workers == 0 for t in todo) and os.environ.get("COMPAT_RAY_LOGS") != "1":
        quiet_in_process_logs(streamed)
    reuse = next(iter(graph.runs.values())).config.resources.group_steps
    queue = _Queue(list(graph.tasks.values()), done, remote, reuse, step_by_step)
    try:
        _drive(graph, root, queue, remote, max_groups, on_finished, display, cancel)
    finally:
        attempts.end(root, queue.attempts)


def _drive(graph: TaskGraph, root: RunStorage, queue: "_Queue", remote: bool, max_groups: Optional[int],
           on_finished: Callable[[str], None], display, cancel: Optional[threading.Event]) -> None:
    capacity = _Capacity(max_groups) if remote else None
    threads: list[threading.Thread] = []
    errors: dict[str, BaseException] = {}
    cursor = 0
    try:
        while True:
            all_done = queue.call("finished")  # asked before the events, so the last task's are among them
            for event, task_id in queue.call("events_since", cursor):
                cursor += 1
                if event == "finished":
                    on_finished(task_id)
                if display is not None:
                    display.event(event, task_id)
            if all_done:
                break
            if cancel is not None and cancel.is_set():
                _end_groups(queue, threads)
                raise RunCancelled("the run was cancelled; finished steps are kept (--resume continues)")
            _open_groups(graph, root, queue, capacity, threads, errors)
            if display is not None:
                display.tick(queue.call("running"))
            time.sleep(POLL_S)
    except BaseException:  # Ctrl-C or a bug here: leave now; Ray ends the groups this driver owns
        queue.close()
        raise
    for thread in threads:
        thread.join()
    queue.close()
    failures = queue.failures
    if failures:
        first = next(iter(failures))
        cause = next(iter(errors.values()), None)
        if cause is not None and not isinstance(cause, Exception):
            raise cause  # an interrupt inside an in-process group, as if it had reached this thread
        if cause is not None:
            raise explain_failure(cause, graph.describe(first)) from cause
        raise RunError(f"{graph.describe(first)} did not finish: {failures[first]} (finished tasks are kept; "
                       f"--resume continues)")


def quiet_in_process_logs(streamed: bool) -> None:
    """Ray Train's per-report and Ray Data's per-execution INFO lines would print over the progress line
    of a group training in this process; warnings still show (--debug, i.e. COMPAT_RAY_LOGS=1, keeps all)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if streamed:
        import ray.data  # noqa: F401  (its import configures the "ray.data" logger, which would undo the level)

        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _streams_data(graph: TaskGraph) -> bool:
    """Whether any run of the graph streams a data section through Ray Data."""
    from orchestrator.config import ExperimentConfig
    from orchestrator.data.streaming import streamed_sections

    return any(isinstance(run.config, ExperimentConfig) and streamed_sections(run.config) for run in graph.runs.values())


def _open_groups(graph, root, queue, capacity, threads, errors) -> None:
    demand = queue.call("demand")
    free = queue.call("free_groups")
    open_shapes = queue.call("open_groups")
    for shape, count in demand.items():
        needed = count - free.get(shape, 0)
        while needed > 0:
            in_process = shape[0] == 0
            if in_process and any(s[0] == 0 for s in open_shapes):
                break  # one in-process group at a time: it trains in this process
            if not in_process and not capacity.admits(shape, [s for s in open_shapes if s[0] > 0]):
                break
            group = queue.call("open_group", shape)
            open_shapes.append(shape)
            thread = threading.Thread(target=_run_group, args=(graph, root, queue, group, shape, errors),
                                      name=f"compat-{group}", daemon=True)
            thread.start()
            threads.append(thread)
            needed -= 1


def _run_group(graph: TaskGraph, root: RunStorage, queue: "_Queue", group: str, shape: tuple,
               errors: dict[str, BaseException]) -> None:
    """One worker group: a Ray Train run whose workers pull tasks until the queue has none for them."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.engine.worker import work

    num_workers, use_gpu, cpus = shape
    first_cfg = next(iter(graph.runs.values())).config
    trainer = TorchTrainer(
        work,
        train_loop_config={
            "root": root, "group": group, "queue": queue.handle(group), "attempts": queue.attempts, "use_gpu": use_gpu,
            "runs": {path: run.config.to_dict() for path, run in graph.runs.items()},
            "tasks": {t.id: {"run": t.run, "name": t.name, "method": t.method, "step": t.step, "action": t.action,
                             "copy_from": t.copy_from, "payload": t.payload} for t in graph.tasks.values()},
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus} if num_workers else None),
        run_config=RunConfig(name=f"{first_cfg.name}-{group}", **ray_storage(root),
                             failure_config=FailureConfig(max_failures=first_cfg.resources.max_failures)),
    )
    error = None
    try:
        trainer.fit()
    except BaseException as exc:  # ray.train.TrainingFailedError and friends
        errors[group] = exc
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"
    finally:
        queue.call("close_group", group, error)


def _end_groups(queue: "_Queue", threads: list[threading.Thread]) -> None:
    """End every open worker group now: the queue answers every claim with DONE from here on, and each
    group's workers are killed, so Ray Train ends the group the way it ends a failed one (its placement
    group removed) instead of leaving it to a controller that dies with this process."""
    import ray

    for worker in queue.call("cancel"):
        ray.kill(worker)
    for thread in threads:
        thread.join()


def ray_storage(root: RunStorage) -> dict:
    """Where Ray Train keeps its own run state: the run's ``ray/``, on the run's filesystem."""
    if root.is_local:
        return {"storage_path": str(root.local_path("ray"))}
    return {"storage_path": root.path("ray"), "storage_filesystem": root.filesystem}


def explain_failure(exc: BaseException, tasks: str) -> Exception:
    """The worker's own error when it is one of ours (a clear sentence), else a RunError that names
    the task; the original traceback stays attached as the cause (shown with --debug)."""
    failures = getattr(exc, "worker_failures", None) or {0: exc}
    for rank, failure in sorted(failures.items()):
        seen = failure
        while seen is not None:
            if isinstance(seen, CompatError):
                return seen
            seen = seen.__cause__ or getattr(seen, "cause", None)
    rank, failure = sorted(failures.items())[0]
    first_line = (str(failure).strip().splitlines() or [""])[-1]
    return RunError(f"{tasks} failed on worker rank {rank}: {type(failure).__name__}: {first_line} "
                    f"(rerun with --debug for the traceback; finished steps are kept, --resume continues)")


def ensure_ray(echo: Callable[[str], None] = print) -> None:
    """Connect to a Ray cluster, or start a private one on this machine, following ``ray.init``'s rule:
    RAY_ADDRESS names the cluster (as under `ray job submit`); without it, a cluster started here with
    `ray start` is joined; ``RAY_ADDRESS=local`` always starts a private cluster. Joining is easy to do
    by accident (someone else's `ray start`), so a joined cluster is named in one line through ``echo``.
    Unless RAY_ADDRESS names a cluster, workers' logs stay in Ray's session log directory (no dashboard
    either) unless COMPAT_RAY_LOGS=1 (--debug)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address == "local" or address is None:
        ray.init(address=address, include_dashboard=False, log_to_driver=os.environ.get("COMPAT_RAY_LOGS") == "1")
    else:
        ray.init(address=address)
    if not _started_here():
        how = "RAY_ADDRESS" if address else "found running on this machine; RAY_ADDRESS=local starts a private one"
        where = address if address and address.startswith("ray://") else ray.get_runtime_context().gcs_address
        echo(f"Joined the Ray cluster at {where} ({how}): {describe_cluster()}")


def _started_here() -> bool:
    """Whether ``ray.init`` started the cluster this driver is connected to (rather than joining one).
    Ray exposes no public flag for it: its driver node is a head node only when it started one."""
    import ray._private.worker

    node = ray._private.worker._global_node
    return bool(node is not None and node.head)


def describe_cluster() -> str:
    """The connected cluster in a few words: alive nodes, CPUs and GPUs."""
    import ray

    def count(n: float, word: str) -> str:
        return f"{n:g} {word}{'' if n == 1 else 's'}"

    total = ray.cluster_resources()
    return ", ".join([count(sum(1 for node in ray.nodes() if node.get("Alive")), "node"),
                      count(total.get("CPU", 0), "CPU"), count(total.get("GPU", 0), "GPU")])


def driver_resources(cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """The custom resources a driver asks for: a share of TRAIN_DRIVER_RESOURCE when the cluster declares it.

    cluster.yaml, cluster.local.yaml and the KubeRay manifests declare it on the head node only, so a
    sweep trial, a trial's simulation task and the task queue (and with them Ray Train's controllers,
    which follow their driver's node) stay off preemptible GPU workers, whose loss would end the run
    instead of restarting a worker group. A cluster without it (e.g. a local one) gets no extra request.
    """
    return {DRIVER_RESOURCE: DRIVER_SHARE} if cluster_resources.get(DRIVER_RESOURCE, 0) > 0 else {}


def _queue_resources() -> dict[str, float]:
    """The queue actor's custom resources: a driver share, unless this driver runs inside a placement
    group (a sweep trial's, which Tune placed on a driver node): the actor then starts inside it, where
    the trial's own bundle has no share left over."""
    import ray

    if ray.get_runtime_context().get_placement_group_id() is not None:
        return {}
    return driver_resources(ray.cluster_resources())


class _Capacity:
    """Whether the cluster holds one more worker group of a shape next to the open ones."""

    def __init__(self, max_groups: Optional[int]):
        import ray

        total = ray.cluster_resources()
        self.cpus, self.gpus, self.max_groups = total.get("CPU", 0.0), total.get("GPU", 0.0), max_groups

    def admits(self, shape: tuple, open_shapes: list[tuple]) -> bool:
        if not open_shapes:
            return True  # one group always starts (an autoscaling cluster grows for it)
        if self.max_groups is not None and len(open_shapes) >= self.max_groups:
            return False
        shapes = [*open_shapes, shape]
        cpus = sum(n * c for n, _, c in shapes)
        gpus = sum(n for n, gpu, _ in shapes if gpu)
        return cpus <= self.cpus + 1e-9 and gpus <= self.gpus + 1e-9


class _Queue:
    """The driver's handle on the queue: a Ray actor when groups run on the cluster, else the object."""

    def __init__(self, tasks, done, remote: bool, reuse_groups: bool, step_by_step: bool):
        import uuid

        from orchestrator.storage.attempts import new_execution

        self.remote = remote
        if remote:
            import ray

            queue = ray.remote(num_cpus=0, max_concurrency=1, resources=_queue_resources())
            self.actor = queue(TaskQueue).remote(tasks, done, reuse_groups, step_by_step)
        else:
            self.name = f"queue-{uuid.uuid4().hex}"
            _LOCAL_QUEUES[self.name] = TaskQueue(tasks, done, reuse_groups, step_by_step)
        self.failures: dict[str, str] = {}
        self.attempts = new_execution()  # where its groups' attempt records live (orchestrator/storage/attempts.py)

    def call(self, method: str, *args):
        if self.remote:
            import ray

            return ray.get(getattr(self.actor, method).remote(*args))
        return getattr(_LOCAL_QUEUES[self.name], method)(*args)

    def handle(self, group: str):
        return self.actor if self.remote else self.name

    def close(self) -> None:
        self.failures = self.call("failures")
        if self.remote:
            import ray

            ray.kill(self.actor)
        else:
            _LOCAL_QUEUES.pop(self.name, None)


class QueueClient:
    """A worker's side of the queue (the actor handle, or the in-process queue's name)."""

    def __init__(self, handle):
        self.handle = handle

    def call(self, method: str, *args):
        if isinstance(self.handle, str):
            return getattr(_LOCAL_QUEUES[self.handle], method)(*args)
        import ray

        return ray.get(getattr(self.handle, method).remote(*args))

    def join(self, group: str) -> None:
        """A worker on the cluster hands the queue its actor handle, so that a cancelled run can end it."""
        if not isinstance(self.handle, str):
            import ray

            self.call("join", group, ray.get_runtime_context().current_actor)

    def next_task(self, group: str, seq: int) -> Optional[str]:
        """The group's ``seq``-th task, waiting while one is about to become ready; None: leave."""
        while True:
            answer = self.call("claim", group, seq)
            if answer == DONE:
                return None
            if answer != WAIT:
                return answer
            time.sleep(POLL_S)
