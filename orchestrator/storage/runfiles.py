"""The run's layout: which key holds what, and the typed reads and writes of each, on a :class:`RunStorage`.

::

    config.yaml                          resolved config (seed included)
    run.json                             provenance (code revision, library versions)
    lease.json                           the driver that works in the run (orchestrator/storage/lease.py)
    attempts/<execution>/<group>/        each start of a worker group while the driver runs the task graph
                                         (orchestrator/storage/attempts.py); deleted when it ends
    manifest/<task>.json                 one completion record per finished task (``<method>/step-NNN``, ...),
                                         with the size and SHA-256 of every artefact it vouches for
    reembed/<task>.json                  a task whose weights passed verification but whose embeddings did
                                         not: its former manifest entry, until it commits again
    versions/<method>/vK/model.pt        final weights of version K (tensors only), and meta.json
    epochs/<method>/step-NNN.pt          last finished epoch of an unfinished step (resume point)
    rows/<method>/row-NNN.json           row K of the compatibility matrices
    indexes/<method>/vK/<eval set>.faiss approximate index of version K's gallery (evaluation.search.index)
    store/                               the embedding store
    ray/                                 Ray Train run state (deterministic run names)
    progress/<method>.json               the running step's epoch and loss (for the progress display)
    replay/<method>/after-step-NNN.json  replay memory (training-split indices) after step N
    upstream/<digest>/                   a nested run per upstream (replacement) model
    seed-<s>/                            a cross-modal run's per-seed state (stage states, store)
    service/<method>/served_versions.parquet  the version serving each gallery item per step, policy and budget
    service/<method>/record.json         its size and SHA-256 (it is derived at the end, in no task's entry)
    metrics.json, report.md, *.png, *.csv

Every function takes the run as a :class:`RunStorage` or a location (a path or URI); the write rules
(whole objects, the manifest entry of a task written last) are :class:`RunStorage`'s. Keys of artefacts
in a manifest entry are relative to the run the entry belongs to (see orchestrator/storage/verify.py).
"""

from __future__ import annotations

import re
import socket
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from orchestrator.errors import RunError
from orchestrator.storage.run_storage import Artefact, Location, RunStorage

if TYPE_CHECKING:
    import pyarrow as pa

    from methods.base import StoredWeights, Weights

Run = Union[RunStorage, Location]

CONFIG = "config.yaml"
PROVENANCE = "run.json"
METRICS = "metrics.json"
REPORT = "report.md"


def storage(run: Run) -> RunStorage:
    return RunStorage.of(run)


# -- layout ------------------------------------------------------------------------------------
def store_dir(run: Run) -> RunStorage:
    """The embedding store's storage inside the run."""
    return storage(run).child("store")


def upstream_dir(run: Run, digest: str) -> RunStorage:
    """The nested run of an upstream (replacement) model."""
    return storage(run).child(f"upstream/{digest}")


def runs_in(run: Run) -> list[str]:
    """The run at ``run`` and every run nested in it (``seed-<s>``, ``upstream/<digest>``, and seeds'
    upstream models), as paths relative to it; each is a directory holding a config.yaml."""
    run = storage(run)
    document = read_config(run)
    if document is None:
        return []
    found = []
    for base in ["", *(f"seed-{seed}" for seed in document.get("seeds") or [])]:
        if base and not run.exists(f"{base}/{CONFIG}"):
            continue  # a cross-modal run's per-seed directories hold no run of their own
        found.append(base)
        upstream = f"{base}/upstream" if base else "upstream"
        found += sorted(f"{upstream}/{digest}" for digest, _, rest in
                        (key.partition("/") for key in run.list(upstream)) if rest == CONFIG)
    return found


def is_store_key(key: str) -> bool:
    """Whether a run's key (an artefact of a manifest entry) lies in one of the run's embedding stores
    (``store/...``, a cross-modal seed's ``seed-<s>/store/...``)."""
    parts = key.split("/")
    return parts[0] == "store" or (len(parts) > 1 and re.fullmatch(r"seed-\d+", parts[0]) is not None
                                   and parts[1] == "store")


def artefact_records(artefacts: Mapping[str, Artefact], prefix: str = "") -> dict[str, dict]:
    """A manifest entry's ``artefacts`` field: each key (under ``prefix``) with its size and SHA-256."""
    prefix = prefix.strip("/")
    return {f"{prefix}/{key}" if prefix else key: artefact.to_json() for key, artefact in sorted(artefacts.items())}


def store_records(run: Run, partitions: list[tuple[str, int, str]], prefix: str = "store") -> dict[str, dict]:
    """The records of complete store partitions ``(method, version, eval set)`` of the store at ``prefix``."""
    from orchestrator.storage.store import EmbeddingStore

    store = EmbeddingStore(storage(run).child(prefix))
    records: dict[str, dict] = {}
    for method, version, eval_set in partitions:
        records.update(artefact_records(store.artefacts(method, version, eval_set), prefix))
    return records


def version_key(method: str, version: int) -> str:
    return f"versions/{method}/v{version}"


def task_manifest_key(name: str) -> str:
    """The manifest entry of a task of the run (``<method>/step-NNN``, ``encode-old``, ...)."""
    return f"manifest/{name}.json"


def manifest_key(method: str, step: int) -> str:
    return task_manifest_key(f"{method}/step-{step:03d}")


def row_key(method: str, step: int) -> str:
    return f"rows/{method}/row-{step:03d}.json"


def epoch_state_key(method: str, step: int) -> str:
    return f"epochs/{method}/step-{step:03d}.pt"


def progress_key(method: str) -> str:
    return f"progress/{method.replace('/', '--')}.json"


def replay_key(method: str, step: int) -> str:
    return f"replay/{method}/after-step-{step:03d}.json"


def relative_to_run(checkpoint: Optional["Weights"], run: Run) -> Optional[str]:
    """Where a checkpoint came from, for a manifest: weights stored in the run as their key relative to it
    (so a moved run stays valid); a file from elsewhere as given."""
    from methods.base import StoredWeights

    if checkpoint is None:
        return None
    root = storage(run).root.rstrip("/") + "/"
    target = checkpoint.name if isinstance(checkpoint, StoredWeights) else storage(checkpoint).root
    return target[len(root):] if target.startswith(root) else str(checkpoint)


# -- cross-modal layout -------------------------------------------------------------------------
CROSSMODAL_VERSIONS = {"old": 0, "new": 1}  # store versions of the two CLIPs; projected queries are version 1 too


def seed_dir(run: Run, seed: int) -> RunStorage:
    """A cross-modal run's per-seed storage (its methods' stage states and projected queries)."""
    return storage(run).child(f"seed-{seed}")


def state_key(method: str, stage: str) -> str:
    """A cross-modal method's state after ``stage``, inside its seed's storage."""
    return f"states/{method}/{stage}.pt"


# -- manifest ----------------------------------------------------------------------------------
def task_done(run: Run, name: str) -> bool:
    return storage(run).exists(task_manifest_key(name))


def step_done(run: Run, method: str, step: int) -> bool:
    return task_done(run, f"{method}/step-{step:03d}")


def mark_task_done(run: Run, name: str, entry: dict) -> None:
    """The task's completion record: written after every artefact it vouches for."""
    storage(run).write_json(task_manifest_key(name), entry)


def mark_step_done(run: Run, method: str, step: int, entry: dict) -> None:
    mark_task_done(run, f"{method}/step-{step:03d}", entry)


def manifest_entry(run: Run, method: str, step: int) -> Optional[dict]:
    return storage(run).read_json_or_none(manifest_key(method, step))


# -- can this process see the run? ----------------------------------------------------------------
STORAGE_ADVICE = ("a multi-node run needs output_dir (compat run --output-dir) on a mount that every node sees at "
                  "the same path, or on object storage (s3://bucket/prefix, gs://bucket/prefix); see "
                  "docs/guide/storage.md")


def check_driver(run: Run) -> None:
    """Raise a RunError that says what to set unless this process sees the run its driver holds.

    Every worker calls it, with the top of the run, before it takes a task. The driver writes its lease
    record there (``lease.json``, orchestrator/storage/lease.py) before any worker group starts, and the
    workers' storage carries that lease's fence (holder and generation). A worker that reads no record
    there, or an older one (a lower generation: an earlier run at the same path on its own disk), does
    not see the driver's run — a local directory on a node that does not share it — and would train into
    a place the driver never reads. A record it cannot read at all means no route to the storage or no
    credentials on this node. A newer holder is the fence's own error (another driver took over)."""
    from orchestrator.storage.lease import read_lease

    run = storage(run)
    fence = run.fence
    if fence is None:
        return  # not written under a lease
    node = socket.gethostname()
    try:
        record = read_lease(run)
    except (OSError, RunError) as exc:
        raise RunError(f"node {node} cannot read the run at {run.location} ({str(exc).strip()}); every node needs "
                       "network access to the storage and its credentials in its environment (see "
                       "docs/guide/storage.md)") from None
    if record is None or int(record.get("generation", 0)) < fence.generation:
        seen = "nothing of it is there" if record is None else \
            f"only an earlier run's lease, from host {record.get('host')}"
        raise RunError(f"node {node} does not see the run that its driver writes at {run.location} ({seen}); "
                       f"{STORAGE_ADVICE}")
    fence.check()


def reembed_key(name: str) -> str:
    """Where a task waits whose weights passed verification but whose embeddings did not."""
    return f"reembed/{name}.json"


def pending_reembed(run: Run, name: str) -> Optional[dict]:
    """The former manifest entry of a task that is to embed again from its kept weights, or None."""
    return storage(run).read_json_or_none(reembed_key(name))


# -- weights -----------------------------------------------------------------------------------
def save_version(run: Run, method: str, version: int, state_dict: dict, meta: dict) -> dict[str, dict]:
    """Final weights of a version: tensors only, so ``torch.load(weights_only=True)`` reads them.
    Returns their records for the step's manifest entry."""
    key, run = version_key(method, version), storage(run)
    weights = run.save_torch(f"{key}/model.pt", {k: v.detach().cpu() for k, v in state_dict.items()})
    meta = run.write_json(f"{key}/meta.json", meta)
    return artefact_records({f"{key}/model.pt": weights, f"{key}/meta.json": meta})


def save_gallery_upgrade(run: Run, method: str, version: int, tensors: dict) -> dict[str, dict]:
    """The map a version declares for the vectors a gallery stores from the version before it (an
    old-to-new adapter: stored vectors are upgraded, not re-embedded). Returns its manifest records."""
    key = f"{version_key(method, version)}/gallery_upgrade.pt"
    return artefact_records({key: storage(run).save_torch(key, {k: v.detach().cpu() for k, v in tensors.items()})})


def gallery_upgrade(run: Run, method: str, version: int) -> Optional[dict]:
    """The tensors :func:`save_gallery_upgrade` stored for ``version``, or None when it declares no map."""
    key, run = f"{version_key(method, version)}/gallery_upgrade.pt", storage(run)
    return run.load_torch(key) if run.exists(key) else None


def version_weights(run: Run, method: str, version: int) -> dict:
    return storage(run).load_torch(f"{version_key(method, version)}/model.pt")


def version_meta(run: Run, method: str, version: int) -> dict:
    return storage(run).read_json(f"{version_key(method, version)}/meta.json")


def stored_weights(run: Run, key: str) -> "StoredWeights":
    """The weights object at ``key`` as a method loads it (:func:`methods.base.load_state_dict`): read
    through the run's storage when loaded, so it works on any filesystem the run lives on."""
    from methods.base import StoredWeights

    run = storage(run)
    return StoredWeights(name=run.path(key), read=partial(run.read_bytes, key))


def version_checkpoint(run: Run, method: str, version: int) -> "StoredWeights":
    """The final weights of a version, as a method's ``load_weights`` takes them."""
    return stored_weights(run, f"{version_key(method, version)}/model.pt")


def save_epoch_state(run: Run, method: str, step: int, state: dict) -> None:
    storage(run).save_torch(epoch_state_key(method, step), state)


def load_epoch_state(run: Run, method: str, step: int) -> Optional[dict]:
    run, key = storage(run), epoch_state_key(method, step)
    if not run.exists(key):
        return None
    try:
        return run.load_torch(key)
    except Exception as exc:
        raise RunError(f"epoch checkpoint {run.location_of(key)} is corrupt ({exc}); delete it to restart that step") from None


def clear_epoch_state(run: Run, method: str, step: int) -> None:
    storage(run).delete(epoch_state_key(method, step))


# -- rows --------------------------------------------------------------------------------------
def read_row(run: Run, method: str, step: int) -> Optional[dict]:
    return storage(run).read_json_or_none(row_key(method, step))


def write_row(run: Run, method: str, step: int, row: dict) -> None:
    storage(run).write_json(row_key(method, step), row)


def delete_row(run: Run, method: str, step: int) -> None:
    storage(run).delete(row_key(method, step))


# -- approximate indexes -----------------------------------------------------------------------
def index_key(method: str, version: int, eval_set: str) -> str:
    return f"indexes/{method}/v{version}/{eval_set}.faiss"


def delete_indexes(run: Run, method: str, version: int) -> None:
    """Every approximate index of version ``version``'s galleries (they are built again from its new vectors)."""
    storage(run).delete_all(f"indexes/{method}/v{version}")


# -- service simulation ----------------------------------------------------------------------
def served_versions_key(method: str) -> str:
    return f"service/{method}/served_versions.parquet"


def service_record_key(method: str) -> str:
    return f"service/{method}/record.json"


def write_served_versions(run: Run, method: str, table: "pa.Table") -> None:
    """The service simulation's per-item bookkeeping of one method (a deterministic function of the
    config and the stored labels: rewritten identically on resume), then its record: the table's size
    and SHA-256 under ``artefacts``, as a manifest entry holds them, so that verification sees it damaged."""
    import pyarrow.parquet as pq

    output = storage(run).open_output(served_versions_key(method))
    with output as sink:
        pq.write_table(table, sink, compression="zstd")
    storage(run).write_json(service_record_key(method), {"artefacts": {served_versions_key(method): output.artefact.to_json()}})


def delete_served_versions(run: Run, method: str) -> None:
    """The table and its record (the record first: a table without one is never checked, then rewritten)."""
    storage(run).delete(service_record_key(method))
    storage(run).delete(served_versions_key(method))


def service_methods(run: Run) -> list[str]:
    """The methods whose served-versions table has a record in ``run``."""
    suffix = "/" + service_record_key("").rsplit("/", 1)[1]
    return [key.removesuffix(suffix) for key in storage(run).list("service") if key.endswith(suffix) and key.count("/") == 1]


def read_served_versions(run: Run, method: str) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(storage(run).read_bytes(served_versions_key(method))))


# -- progress ----------------------------------------------------------------------------------
def write_progress(run: Run, method: str, progress: dict) -> None:
    """The running step's epoch and losses, one object per method (several chains train at once)."""
    storage(run).write_json(progress_key(method), progress)


def read_progress(run: Run, method: str) -> Optional[dict]:
    try:
        return storage(run).read_json_or_none(progress_key(method))
    except (OSError, RunError):
        return None


def read_metrics(run: Run) -> Any:
    run = storage(run)
    if not run.exists(METRICS):
        raise RunError(f"{run.location} has no {METRICS}; run the experiment (or --resume it) first")
    return run.read_json(METRICS)


# -- config ------------------------------------------------------------------------------------
def read_config(run: Run) -> Optional[dict]:
    """The run's resolved config as written (a plain mapping), None when the location holds no run."""
    import yaml

    run = storage(run)
    return yaml.safe_load(run.read_text(CONFIG)) if run.exists(CONFIG) else None


def write_config(run: Run, document: dict) -> None:
    import yaml

    storage(run).write_text(CONFIG, yaml.safe_dump(document, sort_keys=False))
