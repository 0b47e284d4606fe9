"""Verifying a run against its completion records: does every artefact a manifest entry vouches for still
hold the bytes it recorded?

A task's manifest entry lists, under ``artefacts``, each object the task wrote (weights, store shards and
markers, stage states, replay memory) with its byte size and SHA-256, keys relative to the entry's run.
Checking sizes costs one metadata request per object, so ``--resume`` and ``compat report`` always do it;
checking digests reads every byte, so they do it with ``--verify``. Matrix rows (``rows/``) are derived
from the store by the driver and carry no record: a row that does not parse counts as damaged. The
service simulation's served-versions tables, also derived at the end, each have a record of their own
(``service/<method>/record.json``, the same ``artefacts`` field) and are checked like a task's artefacts.

What to do about damage is the engine's business (orchestrator/engine/repair.py): this module only finds it.
Entries written before artefacts were recorded (no ``artefacts`` field) cannot be checked; they are
reported as *unrecorded* and trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from orchestrator.errors import RunError
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage

ARTEFACTS = "artefacts"  # the manifest entry's field: {key: {"size": bytes, "sha256": hex}}


@dataclass(frozen=True)
class Damage:
    """One object that no longer matches its record."""

    key: str  # relative to its run
    problem: str  # "missing", "has 10 bytes, 20 recorded", ...
    by_digest: bool = False  # found only by hashing: a size check (plain --resume) does not see it

    def __str__(self) -> str:
        return f"{self.key} {self.problem}"


@dataclass
class Verification:
    """What :func:`verify_run` found in a run and the runs nested in it."""

    root: RunStorage
    digests: bool  # whether SHA-256 was checked (sizes always are)
    checked: int = 0  # finished tasks whose records were checked
    damaged: dict[tuple[str, str], list[Damage]] = field(default_factory=dict)  # (run, task name) -> damage
    entries: dict[tuple[str, str], Optional[dict]] = field(default_factory=dict)  # every finished task's entry (None: unreadable)
    bad_rows: list[tuple[str, Damage]] = field(default_factory=list)  # (run, row) that does not parse
    bad_service: list[tuple[str, Damage]] = field(default_factory=list)  # (run, served-versions table or its record)
    unrecorded: list[tuple[str, str]] = field(default_factory=list)  # entries without artefact records

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.bad_rows and not self.bad_service

    def findings(self) -> list[str]:
        """One line per damaged object, naming its run and task."""
        lines = []
        for (run, name), damage in self.damaged.items():
            where = f"{run}/" if run else ""
            lines += [f"{where}{d} (task {where}{name})" for d in damage]
        lines += [f"{run}/{d}" if run else str(d) for run, d in [*self.bad_rows, *self.bad_service]]
        return lines

    def advice(self) -> str:
        """The command that recomputes what is damaged (``--verify`` too when only a digest saw it)."""
        needs_digest = any(d.by_digest for damage in [*self.damaged.values(), [d for _, d in self.bad_service]]
                           for d in damage)
        return f"compat run --resume {self.root.location}" + (" --verify" if needs_digest else "")

    def unrecorded_warning(self) -> Optional[str]:
        if not self.unrecorded:
            return None
        return (f"{len(self.unrecorded)} finished task(s) in {self.root.location} were recorded without artefact "
                "sizes and digests (by an older compat) and are trusted unchecked; if one of them is damaged, "
                "delete its manifest entry (RUN/manifest/<task>.json) and resume: that task and everything "
                "derived from it are recomputed")


def check_artefacts(run: RunStorage, records: dict, digests: bool) -> list[Damage]:
    """The objects among ``records`` (a manifest entry's ``artefacts``) that are missing or differ."""
    damage = []
    for key, record in sorted(records.items()):
        size = run.size(key)
        if size is None:
            damage.append(Damage(key, "is missing"))
        elif size != record["size"]:
            damage.append(Damage(key, f"has {size} bytes, {record['size']} recorded (truncated or replaced)"))
        elif digests and run.artefact(key).sha256 != record["sha256"]:
            damage.append(Damage(key, "has the recorded size but not the recorded SHA-256 (its bytes changed)",
                                 by_digest=True))
    return damage


def verify_run(root: RunStorage, digests: bool, runs: Optional[Iterable[str]] = None) -> Verification:
    """Check every finished task of the run at ``root`` and of ``runs`` nested in it (default: every run
    found there, :func:`~orchestrator.storage.runfiles.runs_in`), every matrix row and every recorded
    served-versions table."""
    result = Verification(root, digests)
    for path in (runfiles.runs_in(root) if runs is None else runs):
        run = root.child(path) if path else root
        for name in finished_tasks(run):
            key = runfiles.task_manifest_key(name)
            try:
                entry = run.read_json(key)
            except RunError:
                entry = None
            result.entries[(path, name)] = entry
            if not isinstance(entry, dict):
                result.damaged[(path, name)] = [Damage(key, "does not parse (the task's manifest entry)")]
                continue
            if ARTEFACTS not in entry:
                result.unrecorded.append((path, name))
                continue
            result.checked += 1
            damage = check_artefacts(run, entry[ARTEFACTS], digests)
            if damage:
                result.damaged[(path, name)] = damage
        for key in run.list("rows"):
            try:
                run.read_json(f"rows/{key}")
            except RunError:
                result.bad_rows.append((path, Damage(f"rows/{key}", "does not parse (a matrix row)")))
        result.bad_service += [(path, d) for d in check_service(run, digests)]
    return result


def check_service(run: RunStorage, digests: bool) -> list[Damage]:
    """Each served-versions table of ``run`` that no longer matches its record (or whose record does not parse)."""
    damage = []
    for method in runfiles.service_methods(run):
        key = runfiles.service_record_key(method)
        try:
            records = run.read_json(key)[ARTEFACTS]
        except (RunError, KeyError, TypeError):
            damage.append(Damage(key, "does not parse (the record of a served-versions table)"))
            continue
        damage += check_artefacts(run, records, digests)
    return damage


def finished_tasks(run: RunStorage) -> list[str]:
    """The names of the tasks whose manifest entries exist in ``run`` (not in runs nested in it)."""
    return [key.removesuffix(".json") for key in run.list("manifest") if key.endswith(".json")]
