"""report.html opened in headless Chromium: every plot drawn, no JavaScript error, and a
screenshot kept in test-artifacts/ for a person to look at."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli import write_experiment  # tests/ is on sys.path (pytest rootdir mode)

from slimsearch.cli import main

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# Plots the report draws once enough trials completed: 3 projections, the 3-D view, the
# hypervolume, 3 per-layer heatmaps (bits, sparsity, what structured pruning kept) and the
# parameter importances.
PLOTS = 9


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-default-apps", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *extra,
         page.as_uri()], capture_output=True, text=True, timeout=180)


def script_errors(stderr: str) -> list[str]:
    """JavaScript errors Chromium logged from the page (its WebGL notices are not errors)."""
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line and re.search(r"Uncaught|Error", line) and "GL Driver" not in line]


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (.ci/run installs Debian's "
                                            "chromium package)")
def test_the_report_renders_in_a_browser_without_errors(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path, trials=10)
    run_dir = tmp_path / "run"
    assert main(["run", str(experiment), "--run-dir", str(run_dir)]) == 0
    page = run_dir / "report.html"
    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not script_errors(dom.stderr), script_errors(dom.stderr)
    # plotly marks every div it drew into (the class name also occurs in its own source)
    drawn = re.findall(r'<div[^>]*class="[^"]*\bjs-plotly-plot\b', dom.stdout)
    assert len(drawn) == PLOTS
    for section in ("Summary", "Pareto front", "Pareto-optimal trials", "All three objectives",
                    "Search progress", "Per-layer choices", "Which parameters matter",
                    "Layer sensitivity", "slimsearch export"):
        assert section in dom.stdout, section
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    done = chromium(page, tmp_path / "profile", "--window-size=1300,5200",
                    f"--screenshot={shot}")
    assert done.returncode == 0 and shot.stat().st_size > 50_000


def test_script_errors_are_told_from_webgl_notices() -> None:
    log = ('[1:1:INFO:CONSOLE:9] "Uncaught ReferenceError: f is not defined", source: x (9)\n'
           '[1:1:INFO:CONSOLE:8] "[.WebGL-0x1]GL Driver Message (OpenGL, Performance): stall"\n'
           '[1:1:INFO:CONSOLE:7] "Canvas2D: Multiple readback operations"\n')
    assert script_errors(log) == [log.splitlines()[0]]


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (.ci/run installs Debian's "
                                            "chromium package)")
def test_a_page_that_throws_is_caught(tmp_path: Path) -> None:
    # the check above could pass by seeing nothing: prove it sees a real error of a real page
    page = tmp_path / "throws.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0
    errors = script_errors(dom.stderr)
    assert len(errors) == 1 and "undefinedFunction" in errors[0]
