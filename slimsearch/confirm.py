"""The confirmation pass: every Pareto trial's latency measured again, in one session.

During a search each trial is timed when it finishes, against the teacher in the same moments
(``timing.paired``). At the end of a search (and with ``slimsearch report --confirm``) every
trial on the front is timed again the same way, one after another and to a tighter interval
(2% instead of 5%), so that the figures the front is drawn from are compared in one sitting
and on the same footing. The confirmed figure
is the trial's ratio to the teacher, measured now, times the teacher's latency at rest from
the start of the run: the same anchor as the search's, so the two differ only by what the
ratio did.

The study stays the record of what the search saw: its objectives are not rewritten (the
sampler learned from them, and ``resume`` continues from them). The confirmed figures go to
``confirmed.json`` in the run folder; the report shows them beside the search's, and flags a
trial whose confirmed latency would take it off the front or change its place in the front's
order by latency. Only the latency objective (the first batch size) is confirmed.

The target's other batch sizes are reported, not searched on, so a search does not time its
trials at them: this pass times each Pareto trial there too, once, to the reported figures'
looser interval (``evaluators.REPORTED_PRECISION``), and the report's columns for them come
from here (a trial that already has such a figure, from a run before this, keeps it).

The pass also settles which seeded baselines the search beat (``head_to_head``). A searched
trial more accurate and smaller than a baseline is faster or not by its latency figure, and
two figures taken at different moments, each to 5%, do not tell apart two models 2-5% apart
(digits-cnn's fastest int8 recipes with the first layer kept whole or pruned:
benchmarks/RESULTS.md). Where their intervals overlap, the two are timed side by side, the
trial against the baseline, to ``PRECISION``, and the trial is faster where the whole
interval of that ratio is below 1; the report and ``pick`` take that verdict.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slimsearch.atomic import write_json
from slimsearch.compression import MODEL_FILE
from slimsearch.devices import computing, resolve_device
from slimsearch.errors import ConfigError
from slimsearch.evaluators import REPORTED_PRECISION, metric_suffix, reference_from_metrics
from slimsearch.report.data import ReportData, load_report_data
from slimsearch.report.pareto import non_dominated
from slimsearch.report.picks import ranking_key
from slimsearch.run import RunFolder, decidedly_better, undecided
from slimsearch.runtimes import get_runtime
from slimsearch.tasks import make_task
from slimsearch.timing.latency import measure_latency
from slimsearch.timing.paired import TRUSTED, paired_latency

#: The front is timed more tightly than a trial during the search (``timing.paired``'s 5%):
#: a handful of trials, and the figures the report and ``pick`` put side by side.
PRECISION = 0.02


def confirm_front(run_dir: Path, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every Pareto trial of the run again against its teacher, one after another;
    write and return ``confirmed.json``'s contents."""
    data = load_report_data(run_dir)
    folder = RunFolder(data.run_dir)
    config = folder.config()
    target = config.target
    device = resolve_device(target.device)
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir,
                     metrics=config.metrics,
                     options=config.task_options)
    if "latency_ms" not in data.teacher or not data.pareto:
        raise ConfigError(f"{data.run_dir}: nothing to confirm yet (no measured teacher or no "
                          "completed trial); see: slimsearch status " + str(data.run_dir))
    missing = [str(p) for p in [folder.teacher / MODEL_FILE,
                                *(folder.trial(t.number) / MODEL_FILE for t in data.pareto)]
               if not p.is_file()]
    if missing:
        raise ConfigError(f"cannot confirm the front: {', '.join(missing)} missing (deleted, or "
                          "the run folder was copied without it)")
    batch = target.batch_size
    say(f"confirming the latency of {len(data.pareto)} Pareto trials against the teacher")
    found: dict[str, dict[str, Any]] = {}
    with _executables(folder, task, target, device) as executable:
        reference = reference_from_metrics(executable(folder.teacher / MODEL_FILE),
                                           data.teacher, target.batch_sizes)
        anchor = reference.anchor_ms[batch]
        for t in data.pareto:
            ours = executable(folder.trial(t.number) / MODEL_FILE)
            latency = _timed(ours, batch, reference, task, target, device, precision=PRECISION)
            found[str(t.number)] = {
                "latency_ms": latency.median_ms, "search_latency_ms": t.metrics["latency_ms"],
                "ratio": latency.ratio, "ratio_low": latency.ratio_low,
                "ratio_high": latency.ratio_high, "unstable": latency.unstable,
                "reported": _reported(ours, t.metrics, data.teacher, reference, task, target,
                                      device)}
        against = _against_baselines(data, folder, executable, task, target, device, say=say)
    # the trials are the front it confirmed: the report ignores the file once the front moved
    document = {"confirmed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "batch_size": batch, "anchor_ms": anchor,
                "trials": _flagged(data, found), "baselines": against}
    write_json(folder.confirmed, document)
    moved = [n for n, c in document["trials"].items() if c["flag"]]
    say(f"confirmed: {len(found) - len(moved)} of {len(found)} Pareto trials keep their place"
        + (f"; trial{'s' if len(moved) > 1 else ''} {', '.join(moved)} would move (see the "
           "report)" if moved else ""))
    return document


def head_to_head(run_dir: Path, baseline_file: Path, candidates: dict[int, Path], *,
                 name: str = "the baseline", say: Callable[[str], None] = print
                 ) -> dict[str, dict[str, Any]]:
    """Each of ``candidates`` (trial number -> model file) timed against ``baseline_file``
    (called ``name``) side by side, in the run's target, to ``PRECISION``; by trial
    number (a string): the latency ratio to the baseline and its ~95% interval, and
    ``faster``: the whole interval below 1. Two forms within the interval of each other are
    as fast as this measurement can tell (one of digits-cnn's searched trials read 1.008x
    and 0.996x a hand-made recipe in two such timings): neither is faster. Nothing on CUDA:
    its figures are the device's alone."""
    folder = RunFolder(Path(run_dir))
    config = folder.config()
    target, device = config.target, resolve_device(config.target.device)
    if device.type != "cpu" or not candidates:
        return {}
    task = make_task(config.task, seed=config.seed, base_dir=config.base_dir,
                     metrics=config.metrics, options=config.task_options)
    with _executables(folder, task, target, device) as executable:
        return _side_by_side(executable(baseline_file), name, dict(sorted(candidates.items())),
                             executable, task, target, say=say)


def _side_by_side(theirs: Any, name: str, candidates: dict[int, Path],
                  executable: Callable[[Path], Any], task: Any, target: Any, *,
                  say: Callable[[str], None], until_faster: bool = False
                  ) -> dict[str, dict[str, Any]]:
    """``head_to_head`` on materialized forms; in the order of ``candidates`` and, with
    ``until_faster``, only until one is faster."""
    batch = target.batch_size
    their_x = theirs.native(task.example_inputs(batch))
    verdicts: dict[str, dict[str, Any]] = {}
    for number, model_file in candidates.items():
        if until_faster and any(v["faster"] for v in verdicts.values()):
            break
        ours = executable(model_file)
        latency = paired_latency(ours.run, ours.native(task.example_inputs(batch)), theirs.run,
                                 their_x, anchor_ms=1.0, batch_size=batch,
                                 threads=target.threads, precision=PRECISION)
        # median_ms is the ratio (anchor 1), or its slow end where it did not settle
        verdicts[str(number)] = {"ratio": latency.median_ms, "ratio_low": latency.ratio_low,
                                 "ratio_high": latency.ratio_high, "rounds": latency.rounds,
                                 "unstable": latency.unstable,
                                 "faster": latency.ratio_high < 1.0}
        say(f"  trial {number} against {name} side by side: "
            f"{latency.median_ms:.3f}x its latency")
    return verdicts


def _against_baselines(data: ReportData, folder: RunFolder, executable: Callable[[Path], Any],
                       task: Any, target: Any, device: Any, *,
                       say: Callable[[str], None]) -> dict[str, dict[str, dict[str, Any]]]:
    """For each seeded baseline (by trial number) that no searched trial beats by figures
    that can tell, the searched trials ``undecided`` against it, timed side by side
    (``head_to_head``), the most accurate first, until one is faster: one such trial
    settles the verdict, and a long run may hold hundreds of such pairs."""
    if device.type != "cpu":
        return {}
    searched = sorted((t for t in data.completed if not t.baseline),
                      key=lambda t: ranking_key(t.metrics, "accuracy"))
    found = {}
    for b in (t for t in data.completed if t.baseline):
        if any(decidedly_better(t.metrics, b.metrics) for t in searched):
            continue
        candidates = {t.number: folder.trial(t.number) / MODEL_FILE for t in searched
                      if undecided(t.metrics, b.metrics)
                      and (folder.trial(t.number) / MODEL_FILE).is_file()}
        if candidates and (folder.trial(b.number) / MODEL_FILE).is_file():
            say(f"timing up to {len(candidates)} searched trial"
                f"{'s' if len(candidates) > 1 else ''} side by side against baseline "
                f"{b.baseline}: their latency figures do not tell which is faster")
            found[str(b.number)] = _side_by_side(
                executable(folder.trial(b.number) / MODEL_FILE), f"baseline {b.baseline}",
                candidates, executable, task, target, say=say, until_faster=True)
    return found


@contextlib.contextmanager
def _executables(folder: RunFolder, task: Any, target: Any, device: Any
                 ) -> Iterator[Callable[[Path], Any]]:
    """``executable(model_file)``: the file in the target's runtime, materialized once in a
    scratch folder removed at the end (with the device taken for computing meanwhile)."""
    runtime = get_runtime(target.runtime)
    made: dict[Path, Any] = {}
    with tempfile.TemporaryDirectory(prefix="slimsearch-confirm-") as scratch, computing(device):
        def executable(model_file: Path) -> Any:
            if model_file not in made:
                out = Path(scratch) / str(len(made))
                out.mkdir()
                made[model_file] = runtime.materialize(model_file, target=target, device=device,
                                                       out_dir=out,
                                                       example=task.example_inputs(target.batch_size))
            return made[model_file]
        yield executable


def _timed(ours: Any, batch: int, reference: Any, task: Any, target: Any, device: Any,
           **interval: float) -> Any:
    """``ours`` at ``batch``: on the CPU, against the teacher in the same moments, to
    ``interval`` (``paired_latency``'s precision and trust); on CUDA, alone (CUDA events time
    the device alone; no neighbour shares it)."""
    x = ours.native(task.example_inputs(batch))
    if device.type == "cpu" and batch in reference.anchor_ms:
        return paired_latency(ours.run, x, reference.executable.run, reference.inputs(task, batch),
                              anchor_ms=reference.anchor_ms[batch], batch_size=batch,
                              threads=target.threads, reference_batch=reference.batch[batch],
                              **interval)
    return measure_latency(ours.run, x, device=device, threads=target.threads,
                           cuda_graph=target.cuda_graphs, max_cv=target.max_cv,
                           max_repeats=target.max_repeats)


def _reported(ours: Any, metrics: dict[str, Any], teacher: dict[str, Any], reference: Any,
              task: Any, target: Any, device: Any) -> dict[str, dict[str, Any]]:
    """The trial's latency at each of the target's other batch sizes, by batch size: timed
    here against the teacher to ``REPORTED_PRECISION`` (alone on CUDA), or taken from its
    record where the search timed it (a run from before reported sizes were left to this
    pass); with the speedup over the teacher's figure at that batch size."""
    reported = {}
    for position, batch in enumerate(target.batch_sizes):
        if position == 0:
            continue
        suffix = metric_suffix(position, batch)
        teacher_ms = teacher.get(f"latency{suffix}_ms")
        if f"latency{suffix}_ms" in metrics:
            ms, low, high, unstable, timed = (
                metrics[f"latency{suffix}_ms"], metrics.get(f"latency{suffix}_ratio_low"),
                metrics.get(f"latency{suffix}_ratio_high"),
                bool(metrics.get(f"latency{suffix}_unstable")), "search")
        else:
            latency = _timed(ours, batch, reference, task, target, device,
                             precision=REPORTED_PRECISION, trusted=REPORTED_PRECISION)
            ms, low, high, unstable, timed = (latency.median_ms, latency.ratio_low,
                                              latency.ratio_high, latency.unstable, "confirmation")
        reported[str(batch)] = {
            "latency_ms": ms, "ratio_low": low, "ratio_high": high, "unstable": unstable,
            "speedup": round(teacher_ms / ms, 4) if teacher_ms and ms else None,
            "timed_in": timed}
    return reported


def _flagged(data: ReportData, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each confirmed trial with ``flag``: why its confirmed latency would change its place,
    or None. Only a figure that moved by more than a trusted ratio's interval (``TRUSTED``)
    is flagged: within it, two near-equal trials trade places by noise alone. "off the front":
    another trial would dominate it; "order by latency": its rank among the front's latencies
    changed."""
    def objectives(latency: dict[int, float]) -> dict[int, tuple[float, float, float]]:
        return {t.number: (-t.metrics["val_accuracy"], float(t.metrics["size_bytes"]),
                           latency.get(t.number, t.metrics["latency_ms"]))
                for t in data.candidates}

    confirmed = {int(n): c["latency_ms"] for n, c in found.items()}
    front_now = set(non_dominated(objectives(confirmed)))
    searched_order = sorted(confirmed, key=lambda n: (found[str(n)]["search_latency_ms"], n))
    confirmed_order = sorted(confirmed, key=lambda n: (confirmed[n], n))
    flagged = {}
    for n, c in found.items():
        number = int(n)
        moved = abs(c["latency_ms"] / c["search_latency_ms"] - 1) > TRUSTED
        flag = (None if not moved else "off the front" if number not in front_now
                else "order by latency" if searched_order.index(number)
                != confirmed_order.index(number) else None)
        flagged[n] = {**c, "flag": flag}
    return flagged
