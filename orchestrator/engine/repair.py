"""Before a resumed run schedules anything: verify what its finished tasks vouch for, and undo exactly what
no longer holds, so that the executor recomputes the damaged tasks and what was derived from them.

What is recomputed (docs/guide/operations.md, "Damaged artefacts"):

- **Damaged weights** (a version's ``model.pt`` or ``meta.json``, a stage state, replay memory, the
  upstream CLIP, or an unreadable manifest entry): the task runs again, and so does every task that
  depends on it in the task graph, transitively (later versions trained from it, a replacement step
  that swaps it in, later stages), since they were trained from the old bytes and a retrained model may
  differ from them.
- **Damaged embeddings only** (store shards or markers; the weights verify): the weights are kept and the
  task embeds again (a trained step from its stored version; a copied version 0, an encoding or a stage
  runs again, none of which trains a model another task was trained from). Nothing else is recomputed
  but the matrix rows that read those embeddings.
- **A finished task whose dependency is not finished** (its manifest entry was deleted by hand): treated
  as derived from a recomputed task.
- **A damaged served-versions table** (the service simulation's, or its record): derived from the store
  at the end like the rows, so only it goes, with the run's ``metrics.json``; the driver writes both again.

For each method step recomputed or embedded again, its rows from that version on are deleted (a row k
reads versions 0..k), and so are unreadable rows and the ``metrics.json`` of every run concerned; the
driver computes them again at the end. Undoing writes in an order that a crash cannot turn into a false
"finished": a task's manifest entry goes first, its artefacts after.
"""

from __future__ import annotations

from typing import Callable

from orchestrator.engine.graph import TaskGraph, task_id
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage
from orchestrator.storage.verify import ARTEFACTS, Verification, check_artefacts, verify_run


def repair_run(graph: TaskGraph, root: RunStorage, digests: bool, echo: Callable[[str], None]) -> Verification:
    """Verify the finished tasks of ``graph`` (sizes; SHA-256 too with ``digests``) and make every damaged
    task, and what was derived from it, not finished (see the module docstring)."""
    found = verify_run(root, digests, runs=graph.runs)
    warning = found.unrecorded_warning()
    if warning:
        echo(f"warning: {warning}")
    finished = {task_id(run, name) for run, name in found.entries}
    waiting = {t.id for t in graph.tasks.values()  # embeddings pending from an earlier repair
               if _run(root, t.run).exists(runfiles.reembed_key(t.name)) and t.id not in finished}
    recompute, embed_again = set(), set()
    for tid in waiting:  # the weights it is to embed with must still be the ones its former entry recorded
        task = graph.tasks[tid]
        kept = runfiles.pending_reembed(_run(root, task.run), task.name)[ARTEFACTS]
        weights = {key: record for key, record in kept.items() if not runfiles.is_store_key(key)}
        damage = check_artefacts(_run(root, task.run), weights, digests)
        if damage:
            found.damaged[(task.run, task.name)] = damage
            recompute.add(tid)
    for (run, name), damage in found.damaged.items():
        tid = task_id(run, name)
        if tid not in graph.tasks or tid in recompute:
            continue
        weights_intact = found.entries[(run, name)] is not None and all(runfiles.is_store_key(d.key) for d in damage)
        (embed_again if weights_intact else recompute).add(tid)
    has_weights = (finished | waiting) - recompute
    for task in graph.tasks.values():  # plan order is topological: a task's dependencies come first
        if any(d in recompute for d in task.deps) or (
                task.id in has_weights and not all(d in has_weights for d in task.deps)):
            recompute.add(task.id)
    embed_again -= recompute
    redo = [t for t in graph.tasks.values() if t.id in recompute]  # unfinished ones too: their epoch states go
    if not found.ok:
        what = "sizes and SHA-256" if digests else "sizes"
        echo(f"Verified {found.checked} finished task(s) ({what}); damaged:")
        for line in found.findings():
            echo(f"  {line}")
    elif found.checked:
        echo(f"Verified {found.checked} finished task(s) ({'sizes and SHA-256' if digests else 'sizes'}): intact")
    if not (redo or embed_again or found.bad_rows or found.bad_service):
        return found
    for task in redo:
        run = _run(root, task.run)
        entry = found.entries.get((task.run, task.name))
        run.delete(runfiles.task_manifest_key(task.name))  # first: the task is no longer finished
        run.delete(runfiles.reembed_key(task.name))
        for key in (entry or {}).get(ARTEFACTS, {}):
            run.delete(key)
        if task.method is not None:
            runfiles.clear_epoch_state(run, _method_key(graph, task), task.step)
    for tid in embed_again:
        task = graph.tasks[tid]
        run = _run(root, task.run)
        run.write_json(runfiles.reembed_key(task.name), found.entries[(task.run, task.name)])  # first: weights kept
        run.delete(runfiles.task_manifest_key(task.name))
    touched = ({t.run for t in redo} | {graph.tasks[tid].run for tid in embed_again}
               | {run for run, _ in [*found.bad_rows, *found.bad_service]})
    for task in [*redo, *(graph.tasks[tid] for tid in embed_again)]:
        if task.method is not None:
            for version in range(task.step, len(graph.runs[task.run].steps)):
                runfiles.delete_row(_run(root, task.run), _method_key(graph, task), version)
            runfiles.delete_indexes(_run(root, task.run), _method_key(graph, task), task.step)
    for run, damage in found.bad_rows:
        _run(root, run).delete(damage.key)
    for run, damage in found.bad_service:  # service/<method>/...: that method's table and record
        runfiles.delete_served_versions(_run(root, run), damage.key.split("/")[1])
    for run in touched | {""}:
        _run(root, run).delete(runfiles.METRICS)
    finished_redo = [t for t in redo if t.id in finished]
    if finished_redo:
        echo(f"Recomputing {len(finished_redo)} finished task(s) and what was derived from them: "
             + ", ".join(graph.describe(t.id) for t in finished_redo))
    if embed_again:
        echo("Embedding again from verified weights: " + ", ".join(graph.describe(t) for t in sorted(embed_again)))
    return found


def _run(root: RunStorage, path: str) -> RunStorage:
    return root.child(path) if path else root


def _method_key(graph: TaskGraph, task) -> str:
    return graph.runs[task.run].config.methods[task.method].key
