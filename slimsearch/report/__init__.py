"""The report: Pareto data from the study, drawn by plotly into one offline HTML file."""

from __future__ import annotations

from pathlib import Path

from slimsearch.atomic import write_json, write_text
from slimsearch.report.data import ReportData, TrialPoint, load_report_data, pareto_document
from slimsearch.report.html import render_html
from slimsearch.run import OBJECTIVES, load_study

__all__ = ["ReportData", "TrialPoint", "load_report_data", "pareto_document", "render_html",
           "write_report"]


def write_report(run_dir: str | Path) -> Path:
    """(Re)write ``pareto.json`` and ``report.html`` in ``run_dir``; return the report's path.

    Safe to call while a search is running: both files are replaced atomically."""
    from slimsearch.report.analysis import importances

    data = load_report_data(run_dir)
    write_json(data.run_dir / "pareto.json", pareto_document(data))
    found = importances(load_study(data.run_dir), [name for name, _ in OBJECTIVES])
    return write_text(data.run_dir / "report.html", render_html(data, importances=found))
