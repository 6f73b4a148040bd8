"""The ``slimsearch`` command: parsing and messages only; the work happens in the package.

Exit codes: 0 done, 1 a command failed, 2 bad input (nothing was started), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from slimsearch.errors import ArtifactError, ConfigError


def _budget(args: argparse.Namespace, config: Any,
            trials_default: int | None = None) -> tuple[int, float | None]:
    """The trial budget and the deadline in seconds: the command line's, else
    ``trials_default`` (a resumed run's last budget), else the experiment's."""
    from slimsearch.experiment import parse_duration

    trials = next(t for t in (args.trials, trials_default, config.search.trials) if t is not None)
    if trials < 1:
        raise ConfigError(f"--trials {trials}: give a number of trials >= 1")
    if args.timeout is not None:
        return trials, parse_duration(args.timeout, field_name="--timeout")
    timeout = config.search.timeout
    return trials, None if timeout is None else parse_duration(timeout, field_name="search.timeout")


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give a number of worker processes >= 1")


def _with_backend(config: Any, args: argparse.Namespace) -> Any:
    """``config`` with the command line's --backend and --ray-address, where given."""
    import dataclasses

    changes = {k: v for k, v in (("backend", args.backend), ("ray_address", args.ray_address))
               if v is not None}
    if args.ray_address is not None and "backend" not in changes:
        changes["backend"] = "ray"  # an address only means something to the Ray backend
    if changes.get("backend") == "local":  # the experiment's Ray address does not apply
        changes["ray_address"] = None
    return config.with_overrides(search=dataclasses.replace(config.search, **changes))


def _cmd_run(args: argparse.Namespace) -> int:
    from slimsearch.experiment import load_experiment
    from slimsearch.run import RunFolder
    from slimsearch.search import prepare, run_search

    config = load_experiment(args.experiment)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / config.name
    if Path(args.experiment).resolve() == (run_dir / "experiment.toml").resolve():
        config = RunFolder(run_dir).config()  # a worker of `slimsearch resume --workers N`
    config = _with_backend(config, args)
    trials, timeout_s = _budget(args, config)
    storage = args.storage if args.storage is not None else config.search.storage
    if storage is None and RunFolder(run_dir).exists():  # continuing: where the run's study is
        storage = RunFolder(run_dir).settings().get("storage")
    _check_workers(args.workers)
    prepared = prepare(config, run_dir=run_dir, storage_url=storage)
    result = run_search(prepared, Path(args.experiment), trials=trials, timeout_s=timeout_s,
                        workers=args.workers, worker=args.as_worker)  # 0: the main process
    if args.as_worker:  # the main process writes the report
        return 130 if result.interrupted else 1 if result.stopped else 0
    return _after_search(result, prepared.storage_url)


def _cmd_resume(args: argparse.Namespace) -> int:
    from slimsearch.run import load_study
    from slimsearch.run.folder import RunFolder
    from slimsearch.search import prepare, run_search

    folder = RunFolder(Path(args.run_dir))
    config = _with_backend(folder.config(), args)
    _check_workers(args.workers)
    prepared = prepare(config, run_dir=folder.root, storage_url=folder.settings().get("storage"))
    try:
        stored_budget = load_study(folder.root).user_attrs.get("budget")
    except KeyError:  # killed before its study was created
        stored_budget = None
    trials, timeout_s = _budget(args, config, trials_default=stored_budget)
    result = run_search(prepared, folder.root / "experiment.toml", trials=trials,
                        timeout_s=timeout_s, workers=args.workers)
    return _after_search(result, prepared.storage_url)


def _after_search(result: Any, storage: str | None) -> int:
    """Confirm the front's latencies (unless interrupted), write the report (also after Ctrl-C
    or a deadline), say where it is and what comes next; the exit code."""
    from slimsearch.report import write_report
    from slimsearch.run.storage import PASSWORD_ENV

    interrupted = result.interrupted
    if not interrupted and result.completed:
        interrupted = _confirm(result.run_dir)
    report = write_report(result.run_dir)
    print(f"report.html: {report.resolve()}")
    if interrupted and not result.interrupted:  # Ctrl-C in the confirmation pass
        return 130
    if result.interrupted:  # its storage is in run.json, without the password used here
        password = (f" (with the storage password in {PASSWORD_ENV} or PGPASSFILE)"
                    if storage and os.environ.get(PASSWORD_ENV) else "")
        print(f"continue with: slimsearch resume {result.run_dir}{password}")
        return 130
    if result.stopped:
        print(f"slimsearch: error: the search stopped early: {result.stopped}", file=sys.stderr)
        return 1
    return 0


def _confirm(run_dir: Path) -> bool:
    """The confirmation pass; if it cannot run, the report is still written without it.
    True when it was interrupted (Ctrl-C)."""
    from slimsearch.confirm import confirm_front

    try:
        confirm_front(run_dir)
    except KeyboardInterrupt:
        print("confirmation pass interrupted: the report shows the search's figures without "
              f"it; run it with: slimsearch report {run_dir} --confirm")
        return True
    except Exception as exc:  # noqa: BLE001 - the search's results stand without it
        print(f"the confirmation pass failed ({type(exc).__name__}: {exc}); the report shows "
              f"the search's figures without it; run it again with: slimsearch report "
              f"{run_dir} --confirm")
    return False


def _cmd_status(args: argparse.Namespace) -> int:
    from slimsearch.report.data import load_report_data
    from slimsearch.run import RunFolder, load_study
    from slimsearch.search.progress import describe_progress
    from slimsearch.search.recovery import OWNER, counted, is_alive

    data = load_report_data(Path(args.run_dir))
    study = load_study(data.run_dir)
    exp = data.settings["experiment"]
    budget = study.user_attrs.get("budget", exp["search"]["trials"])
    print(f"run {data.name}: task {exp['task']}, {counted(study)} of {budget} trials "
          f"done ({data.count('COMPLETE')} complete, {data.count('FAIL')} failed, "
          f"{data.count('PRUNED')} stopped, {data.count('RUNNING')} running)")
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "RUNNING":
            owner = trial.user_attrs.get(OWNER) or {}
            alive = {True: "alive", False: "dead: resume recovers it", None: "another host"}[
                is_alive(owner) if owner else None]
            where = describe_progress(RunFolder(data.run_dir).trial(trial.number))
            print(f"  trial {trial.number} running on {owner.get('host', '?')} pid "
                  f"{owner.get('pid', '?')} ({alive}){f': {where}' if where else ''}")
    if data.teacher_warning:
        print(f"WARNING: {data.teacher_warning}")
    if data.constraints:
        print(f"constraints {data.constraints}: {len(data.feasible)} trials meet them")
    reused, figures = data.latency_cache
    if figures:
        print(f"latency cache: {reused} of {figures} figures reused")
    teacher = data.teacher
    for t in data.pareto[:5]:
        m = t.metrics
        smaller = teacher["size_bytes"] / m["size_bytes"] if teacher else float("nan")
        print(f"  Pareto trial {t.number}: val {data.metric} {m['val_accuracy']:.4f}, "
              f"{m['size_bytes']:,} bytes "
              f"({smaller:.1f}x smaller), {m['latency_ms']:.4f} ms"
              f"{'' if t.feasible else ' (infeasible)'}")
    if len(data.pareto) > 5:
        print(f"  ... {len(data.pareto) - 5} more in report.html")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from slimsearch.report import write_report

    if args.confirm:
        from slimsearch.confirm import confirm_front

        confirm_front(Path(args.run_dir))
    report = write_report(Path(args.run_dir))
    print(f"report.html: {report.resolve()}")
    return 0


def _budget_of(args: argparse.Namespace, data: Any) -> Any:
    from slimsearch.report.picks import Budget
    from slimsearch.tasks.metrics import is_fraction

    for flag in ("max_latency_ms", "max_size_mb", "max_accuracy_drop"):
        value = getattr(args, flag)
        if value is not None and not value > 0 and not (flag == "max_accuracy_drop" and value == 0):
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: give a number > 0")
    fraction = is_fraction(data.teacher or {"metric": data.metric})
    if fraction and args.max_accuracy_drop is not None and args.max_accuracy_drop >= 1:
        raise ConfigError(f"--max-accuracy-drop {args.max_accuracy_drop}: give it as a fraction "
                          f"of {data.metric} (0.01 = one point below the teacher), below 1")
    return Budget(max_latency_ms=args.max_latency_ms,
                  max_size_bytes=args.max_size_mb * 1e6 if args.max_size_mb is not None else None,
                  max_accuracy_drop=args.max_accuracy_drop, metric=data.metric,
                  fraction=fraction)


def _pick(args: argparse.Namespace, *, say: bool) -> int:
    """The picked trial's number; with ``say``, print the choice, the reason and the others.
    ConfigError (exit 2) when the run has no completed trial or none meets the budget."""
    from slimsearch.report.data import load_report_data
    from slimsearch.report.picks import pick
    from slimsearch.tasks.metrics import drop_text

    data = load_report_data(Path(args.run_dir))
    # only trials that meet the experiment's own constraints, unless none does yet
    trials = {t.number: t.metrics for t in data.candidates}
    if not trials:
        raise ConfigError(f"{data.run_dir} has no completed trial yet; see: slimsearch status "
                          f"{data.run_dir}")
    chosen = pick(trials, data.teacher, _budget_of(args, data), prefer=args.prefer)
    if say and data.teacher_warning:
        print(f"WARNING: {data.teacher_warning}; a pick is no better than it")
    if say and data.constraints and not data.feasible:
        print(f"note: no trial meets the experiment's constraints {data.constraints}; "
              "choosing among all completed trials")
    teacher = data.teacher

    def line(number: int) -> str:
        m = trials[number]
        drop = teacher["val_accuracy"] - m["val_accuracy"]
        unstable = (" (unstable: the slow end of its interval)"
                    if m.get("latency_unstable") and m.get("latency_ratio") else "")
        return (f"trial {number}: val {data.metric} {m['val_accuracy']:.4f} "
                f"({drop_text(abs(drop), teacher)} "
                f"{'below' if drop >= 0 else 'above'} the teacher), {m['size_bytes']:,} bytes, "
                f"{m['latency_ms']:.4f} ms{unstable}")

    if chosen.trial is None:
        closest = "; ".join(line(n) for n in chosen.closest)
        raise ConfigError(f"{chosen.reason}. Closest: {closest}. Relax the budget, or search "
                          "longer (slimsearch resume --trials N)")
    if say:
        print(f"picked {line(chosen.trial)}")
        print(f"  why: {chosen.reason}")
        for number in chosen.runner_ups:
            print(f"  runner-up {line(number)}")
        for t, beaten_by in data.against_baselines:
            shown = ", ".join(str(n) for n in beaten_by[:5]) + (", ..." if len(beaten_by) > 5
                                                                 else "")
            print(f"  baseline {t.baseline} (trial {t.number}): "
                  + (f"strictly dominated by trial{'s' if len(beaten_by) > 1 else ''} {shown}"
                     if beaten_by else "no searched trial dominates it"))
        print(f"export it with: slimsearch export {data.run_dir} --trial {chosen.trial} "
              f"--out exported/trial-{chosen.trial}")
    return chosen.trial


def _cmd_pick(args: argparse.Namespace) -> int:
    _pick(args, say=True)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from slimsearch.export import export_trial

    if (args.trial is None) == (not args.pick):
        raise ConfigError("give either --trial N or --pick (with the budget options of "
                          "`slimsearch pick`)")
    trial = args.trial if args.trial is not None else _pick(args, say=True)
    bundle, verification = export_trial(Path(args.run_dir), trial, Path(args.out),
                                        verify=not args.no_verify, tolerance=args.tolerance,
                                        runtime=args.runtime, strict=args.strict)
    print(f"exported trial {trial} to {bundle}; load it with "
          f"slimsearch.load_model({str(bundle)!r})")
    if verification is None:
        return 0
    return _say_verification(verification, bundle / "verification.json")


def _say_verification(verification: dict, where: Path) -> int:
    """Print a re-measurement beside the search's figures; 1 when they differ."""
    fresh = verification["fresh"]
    if not verification["compared"]:
        print(f"measured in a fresh process on runtime {verification['runtime']} (the search "
              f"measured another, so nothing to compare): " + ", ".join(
                  f"{k} {v}" for k, v in fresh.items()))
        return 0 if verification["passed"] else 1
    search = verification["search"]
    print("re-measured in a fresh process (search -> fresh):")
    for name, ok in verification["checks"].items():
        figures = f"{search[name]} -> {fresh[name]}" if name in search else ""
        print(f"  {'ok  ' if ok else 'DIFF'} {name} {figures}")
    if verification.get("latency_adopted"):
        fresh, search = verification["fresh"]["latency_ms"], verification["search"]["latency_ms"]
        print(f"note: only the latency differs from the search's by more than "
              f"{verification['tolerance']:.0%} ({search:.4g} -> {fresh:.4g} ms): accuracy, size "
              "and the executable file are reproduced exactly, so the bundle is written with the "
              "fresh latency as its own and the search's beside it (metrics.json). Use --strict "
              "to make this an error (CI)")
        return 0
    if not verification["passed"]:
        print(f"slimsearch: error: the bundle does not reproduce the search's numbers "
              f"(latency tolerance {verification['tolerance']:.0%}); see {where}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import tempfile

    from slimsearch.atomic import read_json, write_json
    from slimsearch.manifest import check_bundle, is_bundle
    from slimsearch.verification import check_tolerance, verify_in_fresh_process

    bundle = Path(args.bundle)
    check_tolerance(args.tolerance)
    if not is_bundle(bundle):
        raise ConfigError(f"{bundle} is not a slimsearch bundle (no manifest.json); give the "
                          "folder `slimsearch export --out` created")
    try:
        manifest = check_bundle(bundle, exported=True)
    except ArtifactError as exc:  # the bundle is not what was exported: bad input, exit 2
        raise ConfigError(str(exc)) from exc
    print(f"{bundle}: every file matches manifest.json (trial {manifest['trial']}, runtime "
          f"{manifest['runtime']})")
    if args.manifest_only:
        return 0
    run_dir = Path(args.run_dir or manifest["run"])
    if not (run_dir / "run.json").is_file():
        raise ConfigError(f"the bundle's run folder {run_dir} is not here (its task and data "
                          "are needed to re-measure); give it with --run-dir, or check only "
                          "the files with --manifest-only")
    metrics = read_json(bundle / "metrics.json")
    # figures to compare with: the search's, or those measured at export for another runtime
    # (none when it was exported with --no-verify)
    searched = metrics.get("runtime", "torch") == manifest["runtime"] and "latency_ms" in metrics
    try:
        verification = verify_in_fresh_process(bundle, run_dir, metrics if searched else None,
                                               tolerance=args.tolerance)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise ArtifactError(f"cannot re-measure {bundle}: {exc}") from exc
    report = Path(tempfile.mkdtemp(prefix="slimsearch-verify-")) / "verification.json"
    write_json(report, verification)  # the bundle itself stays as its manifest says
    return _say_verification(verification, report)


def _cmd_list(args: argparse.Namespace) -> int:
    from slimsearch.tasks import list_tasks

    print("built-in tasks:")
    tasks = list_tasks()
    width = max(map(len, tasks))
    for name, doc in tasks.items():
        print(f"  {name:<{width}} {doc}")
    folder = Path(args.experiments)
    files = sorted(folder.glob("*.toml")) if folder.is_dir() else []
    print(f"experiments in {folder}/:" if files else f"no experiment files in {folder}/")
    for path in files:
        print(f"  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimsearch",
        description="Search student architecture, per-layer sparsity and bit width for a "
                    "PyTorch model; every objective measured on the real model file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_search_commands(commands)
    _add_reading_commands(commands)
    _add_bundle_commands(commands)
    return parser


def _backend_options(command: argparse.ArgumentParser) -> None:
    from slimsearch.search.backends import BACKENDS

    command.add_argument("--backend", choices=tuple(BACKENDS),
                         help="who runs the trials (default: search.backend, local); with ray, "
                              "--workers is the number of trials at once")
    command.add_argument("--ray-address",
                         help="the Ray cluster to join: auto or host:port (default: start Ray "
                              "on this machine)")


def _budget_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--max-latency-ms", type=float, help="latency budget (ms)")
    command.add_argument("--max-size-mb", type=float,
                         help="size budget of the file (MB, 1 MB = 1,000,000 bytes)")
    command.add_argument("--max-accuracy-drop", type=float,
                         help="validation accuracy at most this below the teacher's "
                              "(fraction: 0.01 = one point)")
    command.add_argument("--prefer", choices=("accuracy", "size", "latency"), default="accuracy",
                         help="what to maximise under the budget (default: accuracy)")


def _tolerance_option(command: argparse.ArgumentParser) -> None:
    from slimsearch.verification import DEFAULT_TOLERANCE

    command.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                         help="how far the fresh latency may be from the search's (fraction, "
                              f"default {DEFAULT_TOLERANCE:.2f})")


def _add_search_commands(commands: Any) -> None:
    run = commands.add_parser("run", help="run (or continue) a search and write its report")
    run.add_argument("experiment", help="experiment TOML file, e.g. experiments/digits_mlp.toml")
    run.add_argument("--trials", type=int, help="total trial budget (default: search.trials)")
    run.add_argument("--timeout", help="no new trial starts after this long, e.g. 30m or 8h")
    run.add_argument("--run-dir", help="run folder (default: runs/<experiment name>)")
    run.add_argument("--storage", help="Optuna storage URL (default: a journal file in the "
                                       "run folder)")
    run.add_argument("--workers", type=int, default=1,
                     help="processes running trials at once on this machine (default 1); "
                          "they share the CPU cores, and latency is timed one at a time")
    _backend_options(run)
    run.add_argument("--as-worker", type=int, default=0, help=argparse.SUPPRESS)
    run.set_defaults(handler=_cmd_run)

    resume = commands.add_parser("resume", help="continue a run folder's search where it stopped "
                                               "(after Ctrl-C, a crash or a kill)")
    resume.add_argument("run_dir")
    resume.add_argument("--trials", type=int,
                        help="total trial budget (default: the run's last one)")
    resume.add_argument("--timeout", help="no new trial starts after this long, e.g. 30m or 8h")
    resume.add_argument("--workers", type=int, default=1,
                        help="processes running trials at once on this machine (default 1)")
    _backend_options(resume)
    resume.set_defaults(handler=_cmd_resume)


def _add_reading_commands(commands: Any) -> None:
    status = commands.add_parser("status", help="how far a run is, what runs now, the best so far")
    status.add_argument("run_dir")
    status.set_defaults(handler=_cmd_status)

    report = commands.add_parser("report", help="(re)write report.html and pareto.json")
    report.add_argument("run_dir")
    report.add_argument("--confirm", action="store_true",
                        help="first time every Pareto trial's latency again against the teacher, "
                             "in one session, and show it beside the search's")
    report.set_defaults(handler=_cmd_report)

    picking = commands.add_parser("pick", help="the best trial under a budget, or the knee "
                                               "point without one")
    picking.add_argument("run_dir")
    _budget_options(picking)
    picking.set_defaults(handler=_cmd_pick)

    listing = commands.add_parser("list", help="built-in tasks and shipped experiments")
    listing.add_argument("--experiments", default="experiments", help=argparse.SUPPRESS)
    listing.set_defaults(handler=_cmd_list)


def _add_bundle_commands(commands: Any) -> None:
    from slimsearch.runtimes import RUNTIMES

    export = commands.add_parser("export", help="a deployable bundle of a trial, re-measured "
                                                "in a fresh process")
    export.add_argument("run_dir")
    export.add_argument("--trial", type=int, help="trial number (see the report)")
    export.add_argument("--pick", action="store_true",
                        help="the trial `slimsearch pick` chooses with the budget options")
    _budget_options(export)
    export.add_argument("--out", required=True, help="bundle folder to create")
    export.add_argument("--runtime", choices=tuple(RUNTIMES),
                        help="the executable form to bundle (default: the one the run searched)")
    _tolerance_option(export)
    export.add_argument("--no-verify", action="store_true",
                        help="skip the fresh-process re-measurement")
    export.add_argument("--strict", action="store_true",
                        help="fail when the fresh latency differs beyond the tolerance (by "
                             "default the bundle takes the fresh figure and says so)")
    export.set_defaults(handler=_cmd_export)

    verify = commands.add_parser("verify", help="check an exported bundle against its manifest "
                                                "and re-measure it in a fresh process")
    verify.add_argument("bundle")
    verify.add_argument("--run-dir", help="the run folder it came from (default: the one its "
                                          "manifest names)")
    _tolerance_option(verify)
    verify.add_argument("--manifest-only", action="store_true",
                        help="check the files' hashes only, without re-measuring")
    verify.set_defaults(handler=_cmd_verify)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # progress lines as they happen, also into a pipe (`| tee run.log`, a parent process)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"slimsearch: error: {exc}", file=sys.stderr)
        return 2
    except ArtifactError as exc:
        print(f"slimsearch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slimsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
