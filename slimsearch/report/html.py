"""Draw ``ReportData`` as one self-contained HTML page (plotly.js embedded: works offline)."""

from __future__ import annotations

import datetime as dt
import html
import shlex

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from slimsearch.report.analysis import (
    BOX_ACCURACY_DROP,
    BOX_LATENCY,
    hypervolume_history,
    layer_grid,
    structure_grid,
)
from slimsearch.report.data import ReportData, TrialPoint
from slimsearch.report.picks import Budget, pick
from slimsearch.runtimes import get_runtime
from slimsearch.tasks.metrics import drop_text, is_fraction

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .muted { color: #666; } .note { background: #fff8e1;
padding: 0.6em 1em; border-left: 4px solid #f0b400; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { cursor: pointer; background: #f4f4f4; } td.l, th.l { text-align: left; }
.flag { color: #b00020; font-size: 0.8em; } .warn { color: #b00020; }
code { font-size: 0.85em; } .grid { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click',
() => { const body = th.closest('table').tBodies[0]; const rows = Array.from(body.rows);
const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
rows.sort((a, b) => { const x = a.cells[col].dataset.v ?? a.cells[col].innerText;
const y = b.cells[col].dataset.v ?? b.cells[col].innerText; const nx = parseFloat(x),
ny = parseFloat(y); const c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
return asc ? c : -c; }); rows.forEach(r => body.appendChild(r)); }));
"""

_AXES = {
    "val_accuracy": "validation accuracy (fraction)",
    "size_bytes": "model file size (bytes, log scale)",
    "latency_ms": "latency per call (ms, median)",
}


def _axis(data: ReportData, key: str) -> str:
    """An axis title; the accuracy objective's says which metric it is."""
    if key != "val_accuracy":
        return _AXES[key]
    fraction = " (fraction)" if is_fraction(data.teacher or {}) else ""
    return f"validation {data.metric}{fraction}"


def _hover(t: TrialPoint) -> str:
    m = t.metrics or {}
    tag = f" ({t.baseline})" if t.baseline else ""
    return (f"trial {t.number}{tag}<br>val {m.get('metric', 'acc')} "
            f"{m.get('val_accuracy', 0):.4f}<br>"
            f"{m.get('size_bytes', 0):,} bytes<br>{m.get('latency_ms', 0):.4f} ms<br>"
            f"{html.escape(t.summary)}")


def _scatter(data: ReportData, x: str, y: str) -> go.Figure:
    fig = go.Figure()
    for label, points, color, symbol in _groups(data):
        points = sorted(points, key=lambda t: t.metrics[x])
        fig.add_trace(go.Scatter(
            x=[t.metrics[x] for t in points], y=[t.metrics[y] for t in points],
            mode="markers", name=label, marker={"color": color, "size": 9, "symbol": symbol},
            text=[_hover(t) for t in points], hoverinfo="text"))
    baselines = [t for t in data.completed if t.baseline]
    if baselines:
        fig.add_trace(go.Scatter(
            x=[t.metrics[x] for t in baselines], y=[t.metrics[y] for t in baselines],
            mode="markers+text", name="baselines", text=[t.baseline for t in baselines],
            textposition="top center", hoverinfo="skip",
            marker={"color": "rgba(0,0,0,0)", "size": 15, "line": {"color": "#d62728", "width": 2}}))
    if data.teacher:
        fig.add_trace(go.Scatter(
            x=[data.teacher[x]], y=[data.teacher[y]], mode="markers", name="teacher (as trained)",
            marker={"symbol": "star", "size": 16, "color": "#ff7f0e"}, hoverinfo="text",
            text=[f"teacher<br>val {data.metric} {data.teacher['val_accuracy']:.4f}<br>"
                  f"{data.teacher['size_bytes']:,} bytes<br>{data.teacher['latency_ms']:.4f} ms"]))
    fig.update_layout(title=f"{y} vs {x}", height=460, margin={"l": 60, "r": 20, "t": 50, "b": 110},
                      xaxis_title=_axis(data, x), yaxis_title=_axis(data, y),
                      legend={"orientation": "h", "y": -0.3})
    for axis, name in (("xaxis", x), ("yaxis", y)):
        if name == "size_bytes":
            fig.update_layout({axis: {"type": "log", "title": _AXES[name]}})
    return fig


def _html(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _groups(data: ReportData) -> list[tuple[str, list[TrialPoint], str, str]]:
    """(label, trials, colour, marker) of the dominated, infeasible and Pareto trials; with no
    feasible trial yet, the front is the best so far (and marked infeasible too)."""
    return [("dominated", [t for t in data.completed if not t.pareto and t.feasible],
             "#bbbbbb", "circle"),
            ("infeasible (misses a constraint)", [t for t in data.completed if not t.feasible],
             "#e377c2", "x"),
            ("Pareto front", [t for t in data.completed
                              if t.pareto and (t.feasible or not data.feasible)],
             "#1f77b4", "circle")]


def _view_3d(data: ReportData) -> str:
    fig = go.Figure()
    for label, points, color, symbol in _groups(data):
        fig.add_trace(go.Scatter3d(
            x=[t.metrics["size_bytes"] for t in points],
            y=[t.metrics["latency_ms"] for t in points],
            z=[t.metrics["val_accuracy"] for t in points], mode="markers", name=label,
            marker={"color": color, "size": 4, "symbol": "x" if symbol == "x" else "circle"},
            text=[_hover(t) for t in points], hoverinfo="text"))
    if data.teacher:
        fig.add_trace(go.Scatter3d(
            x=[data.teacher["size_bytes"]], y=[data.teacher["latency_ms"]],
            z=[data.teacher["val_accuracy"]], mode="markers", name="teacher",
            marker={"color": "#ff7f0e", "size": 7, "symbol": "diamond"}))
    fig.update_layout(title="all three objectives (drag to turn)", height=560,
                      margin={"l": 0, "r": 0, "t": 40, "b": 0},
                      scene={"xaxis": {"title": "size (bytes)", "type": "log"},
                             "yaxis": {"title": "latency (ms)"},
                             "zaxis": {"title": f"val {data.metric}"}})
    return _html(fig)


def _hypervolume(data: ReportData) -> str:
    history = hypervolume_history(data)
    if not history:
        return ""
    fig = go.Figure(go.Scatter(x=[n for n, _ in history], y=[v for _, v in history],
                               mode="lines+markers", marker={"size": 4}))
    fig.update_layout(title="hypervolume of the front after each trial", height=360,
                      xaxis_title="trial number", yaxis_title="hypervolume",
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return (_html(fig) + f"<p class='muted'>In a box relative to the teacher: {data.metric} "
            f"drop up to {drop_text(BOX_ACCURACY_DROP, data.teacher or {})}, size up to the "
            "teacher's, latency up to "
            f"{BOX_LATENCY:g}x the teacher's (each scaled to it); a trial outside the box adds "
            "nothing. Flat means the last trials found nothing better.</p>")


def _layers(data: ReportData) -> str:
    rows, layers, bits, sparsity = layer_grid(data)
    if not rows:
        return ""
    height = 120 + 26 * len(rows)
    parts = []
    for title, grid, scale, zmax in (("bits per layer (32 = float)", bits, "Blues_r", 32),
                                     ("sparsity per layer (fraction of zeros)", sparsity,
                                      "Oranges", 1)):
        text = [["" if v is None else v for v in row] for row in grid]  # a layer it lacks
        fig = go.Figure(go.Heatmap(z=grid, x=layers, y=rows, colorscale=scale, zmin=0, zmax=zmax,
                                   text=text, texttemplate="%{text}", hoverongaps=False))
        fig.update_layout(title=title, height=height,
                          yaxis={"autorange": "reversed", "automargin": True},
                          margin={"l": 10, "r": 10, "t": 40, "b": 40})
        parts.append(_html(fig))
    columns, kept, labels = structure_grid(data)
    if kept:
        fig = go.Figure(go.Heatmap(z=kept, x=columns, y=rows, colorscale="Greens", zmin=0,
                                   zmax=1, text=labels, texttemplate="%{text}",
                                   hoverongaps=False))
        fig.update_layout(title="what each layer kept: attention heads, channels, vocabulary "
                                "(fraction; depth is in the row's label)", height=height,
                          yaxis={"autorange": "reversed", "automargin": True},
                          margin={"l": 10, "r": 10, "t": 40, "b": 40})
        parts.append(_html(fig))
    return "".join(parts) + _left_float(data) + _not_structured(data)



def _left_float(data: ReportData) -> str:
    """Which weights no method of the space reaches, said plainly (they stay float)."""
    counted = [t for t in data.pareto if t.metrics.get("left_float_weights")]
    if not counted:
        return ""
    t = counted[0]
    return (f"<p class='note'>Left float: {t.metrics['left_float_weights']:,} weights of trial "
            f"{t.number} (and of {len(counted) - 1} more Pareto trials) are in tensors no method "
            "of this space reaches: parameters of modules other than the Linear and Conv2d "
            "layers the model calls (attention's packed projections, embeddings, positional "
            "tables). They are stored and run as they are, in float; each trial's build.json "
            "names them (<code>left_float</code>).</p>")


def _not_structured(data: ReportData) -> str:
    """Layers structured pruning could not shrink in this model, said plainly."""
    counted = [t for t in data.trials if (t.metrics or {}).get("structured_blocked_layers")]
    if not counted:
        return ""
    return (f"<p class='note'>Not pruned structurally: {counted[0].metrics['structured_blocked_layers']} "
            "layers of this model cannot lose channels (Torch-Pruning cannot trace them, or the "
            "model's forward fails without them); the search gave them the other methods only. Each trial's "
            "build.json names them and why (<code>structured_blocked</code>).</p>")


def _importance(importances: dict[str, dict[str, float]]) -> str:
    if not importances:
        return ("<p class='muted'>Not enough completed trials yet to say which parameters "
                "matter.</p>")
    fig = go.Figure()
    top = sorted({p for found in importances.values() for p in found},
                 key=lambda p: -max(found.get(p, 0) for found in importances.values()))[:12]
    for objective, found in importances.items():
        fig.add_trace(go.Bar(y=top, x=[found.get(p, 0) for p in top], orientation="h",
                             name=objective))
    fig.update_layout(title="how much of each objective's variation a parameter explains",
                      barmode="group", height=140 + 40 * len(top),
                      yaxis={"autorange": "reversed", "automargin": True},
                      xaxis_title="importance (fANOVA, sums "
                      "to 1 per objective)", margin={"l": 10, "r": 10, "t": 50, "b": 50})
    return (_html(fig) + "<p class='muted'>Importance says how strongly a parameter moves an "
            "objective, not in which direction: the heatmaps above show which values the "
            "best trials took (for accuracy, higher is better; for size and latency, lower).</p>")


def _pareto_table(data: ReportData) -> str:
    teacher_size = data.teacher.get("size_bytes")
    teacher_latency = data.teacher.get("latency_ms")
    extra_batches = list(data.settings["experiment"]["target"].get("batch_sizes", [1])[1:])
    run_dir = shlex.quote(str(data.run_dir))
    knee = pick({t.number: t.metrics for t in data.candidates}, data.teacher, Budget()).trial
    rows = []
    for t in data.pareto:
        m = t.metrics
        infeasible = "" if t.feasible else " <span class='flag'>infeasible</span>"
        ratio = teacher_size / m["size_bytes"] if teacher_size else float("nan")
        speedup = m.get("speedup", teacher_latency / m["latency_ms"] if teacher_latency
                        else float("nan"))
        slower = " <span class='flag'>slower than teacher</span>" if speedup < 1 else ""
        scaled = (" <span class='flag' title='measured while the machine was busy and scaled by "
                  f"its measured slowdown: {_SCALED_ERROR}'>scaled</span>"
                  if m.get("latency_disturbed") else "")
        scaled += (" <span class='flag' title='its ratio to the teacher did not settle, even "
                   "measured again later: the slow end of its interval'>unstable</span>"
                   if m.get("latency_unstable") and m.get("latency_ratio") else "")
        extra = "".join(_reported_cell(data, t.number, m, b) for b in extra_batches)
        command = f"slimsearch export {run_dir} --trial {t.number} --out exported/trial-{t.number}"
        origin = t.baseline or t.start or (t.refine and f"refines {t.refine}")
        label = f" ({origin})" if origin else ""
        if t.number == knee:
            label += " <span class='flag'>knee</span>"
        rows.append(
            f"<tr><td>{t.number}{label}{infeasible}</td>"
            f"<td>{m['val_accuracy']:.4f}</td><td>{m['test_accuracy']:.4f}</td>"
            f"<td data-v='{m['size_bytes']}'>{m['size_bytes']:,}</td><td>{ratio:.1f}x</td>"
            f"<td data-v='{m['latency_ms']}'>{m['latency_ms']:.4f} {_latency_spread(m)}{scaled}</td>"
            f"{_confirmed_cell(data, t.number)}"
            f"<td data-v='{m['latency_p90_ms']}'>{m['latency_p90_ms']:.4f}</td>"
            f"<td data-v='{speedup}'>{speedup:.2f}x{slower}</td>{extra}"
            f"<td>{m.get('int8_layers', 0)}/{len(t.recipe['layers'])}</td>"
            f"<td class='l'>{html.escape(t.summary)}</td>"
            f"<td class='l'><code>{html.escape(command)}</code></td></tr>")
    extra_head = "".join(f"<th>speedup at batch {b}</th>" for b in extra_batches)
    head = (f"<tr><th>trial</th><th>val {data.metric}</th><th>test {data.metric}</th>"
            "<th>size (bytes)</th>"
            "<th>smaller</th><th>latency ms (p50, interval)</th>"
            f"{'<th>confirmed ms</th>' if data.confirmed else ''}<th>p90 ms</th>"
            f"<th>speedup</th>{extra_head}<th>int8 layers</th>"
            "<th class='l'>recipe</th><th class='l'>export</th></tr>")
    return (f"<table class='sortable'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")


def _sensitivity(data: ReportData) -> str:
    """The pre-pass as a table: the objective lost (points, for a fraction) with only that
    layer compressed."""
    found = data.sensitivity
    if not found or not found.get("layers"):
        return ""
    levels = found["levels"]
    columns = ([("bits", str(b), f"{b} bits") for b in levels["bits"]]
               + [("sparsity", str(s), f"{float(s):.0%} zeroed") for s in levels["sparsity"]])
    points = is_fraction(data.teacher or {})
    scale, unit = (100, "points") if points else (1, f"in {data.metric}'s units")

    def cell(drop: float | None) -> str:
        if drop is None:
            return "<td>?</td>"
        shade = min(1.0, max(0.0, drop / 0.05))  # full red at a drop of 0.05 (5 points)
        return (f"<td style='background: rgba(214,39,40,{shade * 0.6:.2f})'>"
                f"{drop * scale:+.{1 if points else 3}f}</td>")

    rows = "".join(
        f"<tr><td class='l'>{html.escape(name)}</td>"
        + "".join(cell(drops[kind].get(level)) for kind, level, _ in columns) + "</tr>"
        for name, drops in found["layers"].items())
    head = "".join(f"<th>{label}</th>" for _, _, label in columns)
    one = (f" (one sample is {100 / levels['samples']:.2f} points)"
           if points and data.metric == "accuracy" else "")
    return (f"<h2>Layer sensitivity</h2><p class='muted'>Validation {html.escape(data.metric)} "
            f"lost ({unit}) when only this layer of the teacher is quantized or pruned "
            f"(magnitude, unstructured), with no fine-tuning, on {levels['samples']} validation "
            f"samples{one}. Measured before the first trial to start "
            f"the search from recipes it suggests (the trials marked sensitivity-&lt;tolerance&gt;: "
            f"every layer at what it tolerates alone within that drop); "
            f"trials fine-tune, so their scores are not the sum of these.</p>"
            f"<table><thead><tr><th class='l'>layer</th>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _failures(data: ReportData) -> str:
    parts = []
    failed = [t for t in data.trials if t.state == "FAIL"]
    if failed:
        items = "".join(f"<li>trial {t.number}: {html.escape(t.error or 'no error recorded')}</li>"
                        for t in failed)
        parts.append(f"<h2>Failed trials ({len(failed)})</h2><ul>{items}</ul>")
    stopped = [t for t in data.trials if t.state == "PRUNED"]
    if stopped:
        items = "".join(f"<li>trial {t.number}: {html.escape(t.stopped or 'no reason recorded')}"
                        "</li>" for t in stopped)
        parts.append(f"<h2>Stopped trials ({len(stopped)})</h2><ul>{items}</ul>")
    return "".join(parts)


def _confirmed_cell(data: ReportData, number: int) -> str:
    """The trial's latency from the last confirmation pass, flagged where it would move the
    trial on the front; nothing when no pass ran."""
    if not data.confirmed:
        return ""
    found = data.confirmed["trials"].get(str(number))
    if found is None:
        return "<td title='on the front since the last confirmation pass'>-</td>"
    flag = (f" <span class='flag' title='the confirmed latency would change its place: "
            f"{found['flag']}'>moves: {found['flag']}</span>" if found["flag"] else "")
    unstable = " <span class='flag'>unstable</span>" if found.get("unstable") else ""
    return (f"<td data-v='{found['latency_ms']}'>{found['latency_ms']:.4f}"
            f" <small>({found['latency_ms'] / found['search_latency_ms'] - 1:+.1%})</small>"
            f"{unstable}{flag}</td>")


def _reported_cell(data: ReportData, number: int, m: dict, batch: int) -> str:
    """The speedup at a reported batch size: the confirmation pass times it for the front
    (a trial of a run from before that has it in its own record)."""
    found = ((data.confirmed or {}).get("trials", {}).get(str(number), {})
             .get("reported", {}).get(str(batch), {}))
    speedup = m.get(f"speedup_b{batch}", found.get("speedup"))
    if speedup is None:
        return ("<td title='timed for the front by the confirmation pass: slimsearch report "
                "RUN --confirm'>?</td>")
    return f"<td data-v='{speedup}'>{speedup:.2f}x</td>"


def _latency_spread(m: dict) -> str:
    """A figure timed against the teacher: its ~95% interval; one timed alone: +- one
    standard deviation of its samples."""
    if m.get("latency_ratio"):
        anchor = m["latency_anchor_ms"]
        return (f"<small title='~95% interval of its ratio to the teacher, times the teacher&#39;s "
                f"latency at rest'>[{m['latency_ratio_low'] * anchor:.4f}, "
                f"{m['latency_ratio_high'] * anchor:.4f}]</small>")
    return f"&plusmn; {m['latency_cv'] * m['latency_ms']:.4f}"


#: How far a latency scaled by the machine's slowdown fell from undisturbed re-measurements
#: (benchmarks/RESULTS.md, the reference 2-core VM).
_SCALED_ERROR = "up to 15% low or 25% high on a busy test VM"


def _baselines(data: ReportData) -> str:
    """Each seeded baseline and the searched trials that beat it in all three objectives."""
    items = []
    for t, beaten_by in data.against_baselines:
        m = t.metrics
        shown = ", ".join(str(n) for n in beaten_by[:10]) + (", ..." if len(beaten_by) > 10 else "")
        verdict = (f"strictly dominated by {len(beaten_by)} searched "
                   f"trial{'s' if len(beaten_by) > 1 else ''}: {shown}" if beaten_by
                   else "<b>no searched trial dominates it</b>")
        timed = data.timed_against(t.number)
        side = "; ".join(f"trial {n} {v['ratio']:.3f}x its latency [{v['ratio_low']:.3f}, "
                         f"{v['ratio_high']:.3f}]" for n, v in
                         sorted(timed.items(), key=lambda kv: kv[1]["ratio"])[:5])
        items.append(f"<li><b>{html.escape(t.baseline)}</b> (trial {t.number}: val "
                     f"{m['val_accuracy']:.4f}, {m['size_bytes']:,} bytes, "
                     f"{m['latency_ms']:.4g} ms): {verdict}"
                     + (f" <span class='muted'>(timed side by side with it: {side})</span>"
                        if side else "") + "</li>")
    if not items:
        return ""
    return ("<h2>Against the baselines</h2><p class='muted'>The recipes seeded into every "
            "study, and the searched trials better than each in validation accuracy, size and "
            "latency alike. A trial more accurate and smaller than a baseline whose latency "
            "figure cannot tell whether it is faster (two readings whose intervals overlap) "
            "was timed side by side with it in the confirmation pass: it is faster where the "
            "whole ~95% interval of that ratio is below 1."
            f"</p><ul>{''.join(items)}</ul>")


def _how_timed(data: ReportData, scaled: int) -> str:
    """How the trials' latencies were measured, and how many cannot be trusted as fast."""
    paired = sum(bool(t.metrics.get("latency_ratio")) for t in data.completed)
    parts = []
    if paired:
        unstable = len(data.unstable_latency)
        parts.append(
            f"{paired} of {len(data.completed)} completed trials were timed against the teacher "
            "in the same moments: each latency is its ratio to the teacher times the teacher's "
            "latency at rest, so a busy machine slows both sides alike"
            + (f"; {unstable} ratio{'s' if unstable > 1 else ''} did not settle even measured "
               "again later, shown at the slow end of the interval (flagged 'unstable')"
               if unstable else ""))
    if scaled:  # runs from before the ratio (timing.paired)
        parts.append(f"{scaled} of {len(data.completed)} completed trials were timed while the "
                     "machine was busy and scaled by its measured slowdown (flagged 'scaled' "
                     f"in the table: {_SCALED_ERROR}; an export re-measures it)")
    if data.confirmed:
        moved = [n for n, c in data.confirmed["trials"].items() if c["flag"]]
        parts.append(
            f"the front's latencies were confirmed in one session on "
            f"{html.escape(data.confirmed['confirmed'])} (column 'confirmed ms'; the search's "
            "own figures stay what the study holds)"
            + (f": trials {', '.join(moved)} would move on the front" if moved
               else ": every trial keeps its place"))
    return "; ".join(parts) or "every completed trial was timed on an undisturbed machine"


def _summary(data: ReportData) -> str:
    exp = data.settings["experiment"]
    target = exp["target"]
    t = data.teacher
    teacher = (f"val {data.metric} {t['val_accuracy']:.4f}, test {data.metric} "
               f"{t['test_accuracy']:.4f}, "
               f"{t['size_bytes']:,} bytes, {t['latency_ms']:.4f} ms" if t else "not measured yet")
    spent = sum(p.seconds or 0 for p in data.trials)
    duplicates = (f", {data.count('DUPLICATE')} drew a finished trial's recipe again (answered "
                  "with its figures, nothing built)" if data.count("DUPLICATE") else "")
    batch_sizes = target.get("batch_sizes", [target.get("batch_size", 1)])  # older run folders
    batches = ", ".join(str(b) for b in batch_sizes)
    reused, figures = data.latency_cache
    cache = (f"{reused} of {figures} latency figures reused from identical executed forms "
             f"({reused / figures:.0%})" if figures else "no latency measured yet")
    int8 = (", with layers on int8 kernels only where they were measured faster at this batch "
            "(column 'int8 layers')" if target.get("runtime", "torch") != "onnxruntime" else "")
    slower = len(data.slower_than_teacher)
    scaled = len(data.scaled_latency)
    busy = _how_timed(data, scaled)
    warning = (f" &mdash; <b class='warn'>warning: {html.escape(data.teacher_warning)}</b>"
               if data.teacher_warning else "")
    rules = data.constraints
    if rules:
        limits = ", ".join(f"{k} = {v}" for k, v in rules.items())
        constraints = f"{limits}; {len(data.feasible)} of {len(data.completed)} completed trials meet them"
        if data.completed and not data.feasible:
            constraints += (" &mdash; <b>no trial meets them yet: the front and the table below "
                            "show the best so far, none of it within the constraints</b>")
    else:
        constraints = "none"
    return (
        f"<ul><li>task <b>{html.escape(exp['task'])}</b>, seed {exp['seed']}</li>"
        f"<li>target: device {html.escape(data.settings.get('device', target['device']))}, "
        f"{get_runtime(target.get('runtime', 'torch')).label}, {target.get('dtype', 'fp32')}, batch "
        f"{batches} (the first is the objective), {target['threads']} CPU thread(s)"
        f"{', CUDA graphs' if target.get('cuda_graphs') else ''}{int8}</li>"
        f"<li>teacher (measured in this run on this target): {teacher}{warning}</li>"
        f"<li>trials: {data.count('COMPLETE')} complete, {data.count('FAIL')} failed, "
        f"{data.count('PRUNED')} pruned, {data.count('RUNNING')} running"
        f"{duplicates}; "
        f"{spent / 60:.1f} min of trial time</li>"
        f"<li>constraints: {constraints}</li>"
        f"<li>latency cache: {cache}</li>"
        f"<li>latency: {busy}</li>"
        f"<li>slower than the teacher at batch {batch_sizes[0]}: {slower} of "
        f"{len(data.completed)} completed trials</li>"
        f"<li>Pareto-optimal trials: {len(data.pareto)}</li></ul>")


def render_html(data: ReportData, importances: dict[str, dict[str, float]] | None = None) -> str:
    """The whole report page as a string; ``importances`` as ``analysis.importances``."""
    figures = ""
    if data.completed:
        pairs = [("size_bytes", "val_accuracy"), ("latency_ms", "val_accuracy"),
                 ("size_bytes", "latency_ms")]
        figures = "<div class='grid'>" + "".join(
            f"<div>{_scatter(data, x, y).to_html(full_html=False, include_plotlyjs=False)}</div>"
            for x, y in pairs) + "</div>"
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>slimsearch: {html.escape(data.name)}</title>
<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body>
<h1>slimsearch report: {html.escape(data.name)}</h1>
<p class="muted">run folder {html.escape(str(data.run_dir))}; written {created}; regenerate with
<code>slimsearch report {html.escape(shlex.quote(str(data.run_dir)))}</code></p>
<h2>Summary</h2>{_summary(data)}
<p class="note">The search selected on the <b>validation</b> split ({html.escape(data.metric)},
the first of the task's metrics). The test score is measured
on a held-out split for information only; differences smaller than one test sample
(1/{len_test(data)}) are noise. Size is the byte length of the file the target's runtime
executes; latency is measured on that executable form, the teacher's on the same target in the
same run.</p>
<h2>Pareto front</h2>{figures or "<p>No trial has completed yet.</p>"}
<h2>Pareto-optimal trials</h2><p class="muted">Click a column to sort. The knee is the most
balanced trade-off (<code>slimsearch pick</code> without a budget); pick under your own budget
with <code>slimsearch pick {html.escape(shlex.quote(str(data.run_dir)))} --max-latency-ms X
--max-size-mb Y</code>.</p>{_pareto_table(data)}
{_baselines(data)}
{f"<h2>All three objectives</h2>{_view_3d(data)}" if data.completed else ""}
<h2>Search progress</h2>{_hypervolume(data) or "<p>No trial has completed yet.</p>"}
<h2>Per-layer choices of the Pareto trials</h2>{_layers(data) or "<p>None yet.</p>"}
<h2>Which parameters matter</h2>{_importance(importances or {})}
{_sensitivity(data)}
{_failures(data)}
<script>{_SORT_JS}</script></body></html>
"""


def len_test(data: ReportData) -> str:
    """Number of test samples, as recorded with the teacher's metrics (``?`` if unknown)."""
    return str(data.teacher.get("test_samples", "?"))
