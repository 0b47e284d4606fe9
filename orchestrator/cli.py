"""The ``compat`` command: run, sweep, report, metrics, compare, check.

Errors the user can act on (bad config, missing data, corrupt files) are printed as one sentence
with a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from orchestrator.errors import CompatError, ConfigError

# Set by Ray's job supervisor in a job's entrypoint: the job's config, its runtime environment included.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def refuse_a_run_in_the_jobs_copy(key: str, location: str) -> None:
    """A job submitted with ``--working-dir`` runs in a temporary copy of that directory on the head,
    which Ray deletes when it needs the room: a relative run location would put the results there."""
    runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    if runtime_env.get("working_dir") and "://" not in location and not os.path.isabs(os.path.expanduser(location)):
        raise ConfigError(key, f"'{location}' is relative, and this Ray job runs in a temporary copy of its "
                               "--working-dir on the head; give an absolute path on storage that outlives the "
                               "job, e.g. --output-dir /mnt/shared/runs")


def _cmd_run(args: argparse.Namespace) -> int:
    """Every kind of experiment (class-incremental, few-shot, replacement, cross-modal) runs the same way."""
    from orchestrator.config.crossmodal import CrossModalExperiment
    from orchestrator.engine.driver import load_run_config, run_experiment
    from orchestrator.engine.validate import load_experiment

    if args.resume:
        if args.config or args.set or args.seeds:
            raise CompatError("--resume continues a run with the config stored in it; drop CONFIG, --set and --seeds")
        cfg, run_dir = load_run_config(args.resume), args.resume
    else:
        seed_list = [f"seeds=[{args.seeds}]"] if args.seeds else []
        cfg, run_dir = load_experiment(args.config, [*args.set, *seed_list]), None
        if args.output_dir:
            cfg.output_dir = args.output_dir
        refuse_a_run_in_the_jobs_copy("output_dir", cfg.output_dir)
    metrics = run_experiment(cfg, run_dir, progress=not args.no_progress, verify=args.verify)
    print()
    print(_summary(metrics, isinstance(cfg, CrossModalExperiment)))
    return 0


def _summary(metrics: dict, crossmodal: bool) -> str:
    from orchestrator.reporting.crossmodal import format_crossmodal_table
    from orchestrator.reporting.report import format_seed_table, format_summary_table

    if crossmodal:
        return format_crossmodal_table(metrics)
    text = format_summary_table(metrics)
    return text + ("\n\n" + format_seed_table(metrics) if metrics.get("seeds") else "")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.tuning.sweep import load_sweep, load_sweep_dir, run_sweep

    if args.resume:
        if args.config or args.set or args.output_dir:
            raise CompatError("--resume continues the sweep stored in EXPERIMENT_DIR; drop CONFIG, --set and --output-dir")
        sweep = load_sweep_dir(args.resume)
    elif not args.config:
        raise CompatError("compat sweep needs a CONFIG with a 'sweep:' section, e.g. configs/sweep_bct_synthetic.yaml")
    else:
        sweep = load_sweep(args.config, args.set, args.output_dir)
        key = "sweep.output_dir" if sweep.config.output_dir else "output_dir"
        refuse_a_run_in_the_jobs_copy(key, sweep.config.output_dir or sweep.experiment.output_dir)
    results = run_sweep(sweep, progress=not args.no_progress)
    if results is None:
        return 130
    print()
    print(results.markdown())
    if results.best is not None:
        where = results.best_config()
        print(f"Best config: {where}  ({'compat run ' + where if results.storage.is_local else 'copy it to a local file, then compat run FILE'})")
    else:
        print("No complete trial satisfies every constraint, so no best config was written.")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.config.crossmodal import is_crossmodal
    from orchestrator.errors import RunError
    from orchestrator.reporting.crossmodal import render_crossmodal_report
    from orchestrator.reporting.report import render_report
    from orchestrator.storage.run_storage import RunStorage
    from orchestrator.storage.runfiles import read_config, read_metrics
    from orchestrator.storage.verify import verify_run

    found = verify_run(RunStorage.at(args.run_dir), digests=args.verify)
    if found.unrecorded_warning():
        print(f"warning: {found.unrecorded_warning()}", file=sys.stderr)
    if not found.ok:
        raise RunError(f"{found.root.location} holds damaged artefacts, so its results no longer match what it "
                       "stores:\n  " + "\n  ".join(found.findings()) + f"\nRun `{found.advice()}`: it recomputes "
                       "exactly the damaged tasks and what was derived from them, then writes the report again")
    crossmodal = is_crossmodal(read_config(args.run_dir) or {})
    path = (render_crossmodal_report if crossmodal else render_report)(args.run_dir)
    print(_summary(read_metrics(args.run_dir), crossmodal))
    print(f"\nReport written to {path}")
    return 0

def build_parser() -> argparse.ArgumentParser:
    from orchestrator.engine.check import add_check_parser
    from orchestrator.evaluation.standalone import add_compare_parser, add_metrics_parser

    parser = argparse.ArgumentParser(prog="compat", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) an experiment; with no CONFIG, the built-in quickstart")
    run.add_argument("config", nargs="?", help="YAML file or built-in config name (default: quickstart)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set training.epochs=4 (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run at RUN_DIR (a path, or a URI such as s3://bucket/prefix/NAME); "
                          "finished steps are not redone unless their artefacts fail verification (sizes, always)")
    run.add_argument("--verify", action="store_true",
                     help="when resuming, also check the SHA-256 of every finished step's artefacts")
    run.add_argument("--output-dir", help="where the run goes, as <output-dir>/<name>: a path (a shared mount on "
                                          "a multi-node cluster) or s3://bucket/prefix, gs://bucket/prefix "
                                          "(default: config output_dir)")
    run.add_argument("--no-progress", action="store_true", help="do not show the live progress line")
    run.add_argument("--seeds", metavar="S1,S2,...",
                     help="run once per seed into RUN_DIR/seed-N and report mean ± std (the config's `seeds:`)")
    run.set_defaults(func=_cmd_run)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep over config keys (the config's `sweep:` section)")
    sweep.add_argument("config", nargs="?", help="YAML file or built-in config name with a sweep: section")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set sweep.num_samples=4 (repeatable)")
    sweep.add_argument("--resume", metavar="EXPERIMENT_DIR",
                       help="continue the sweep in EXPERIMENT_DIR; finished trials are not re-run")
    sweep.add_argument("--output-dir", help="parent directory of the sweep directory (default: sweep.output_dir)")
    sweep.add_argument("--no-progress", action="store_true", help="do not print Tune's trial table")
    sweep.set_defaults(func=_cmd_sweep)

    report = sub.add_parser("report", help="re-render plots and report.md of a finished run from its files")
    report.add_argument("run_dir", help="the run: a path, or a URI such as s3://bucket/prefix/NAME")
    report.add_argument("--verify", action="store_true",
                        help="check the SHA-256 of every finished step's artefacts, not only their sizes")
    report.set_defaults(func=_cmd_report)

    add_metrics_parser(sub)
    add_compare_parser(sub)
    add_check_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["COMPAT_RAY_LOGS"] = "1"  # stream Ray worker logs to the terminal
    previous = _exit_on_sigterm()
    try:
        return args.func(args)
    except CompatError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue with `compat run --resume RUN_DIR`", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM (``kill``, ``ray job stop``, a pod shutting down) unwinds the command as ``sys.exit`` does,
    so the run's lease is released at once instead of expiring (``ray.init`` installs the same kind of
    handler, but runs that train in-process never call it). Returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


if __name__ == "__main__":
    sys.exit(main())
