"""Is the CPU undisturbed right now? A fixed reference workload, timed between the windows of
a latency measurement, answers it.

On a shared machine the same model runs ~1.55x slower for seconds at a time while something
outside this process loads the physical core (measured on the reference 2-core VM:
``benchmarks/RESULTS.md``). Inside such a period the samples stay tightly grouped, so no
statistic of the samples alone can tell a slow period from a slow model. The probe, a fixed
256x256 Linear layer on one sample (about 11 us undisturbed there), slows down with it.

Its undisturbed time, the *floor*, is the lowest burst median seen on this machine with these
threads and this torch. It is kept in a small JSON file beside the device locks, so every
process starts from what earlier ones learned instead of calibrating in a disturbed moment.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimsearch.atomic import write_json
from slimsearch.devices import cpu_model

#: Probe calls per burst; the burst's median is one reading (~0.1 ms of probe per reading).
PROBE_CALLS = 10
#: A reading at most this fraction above the floor counts as undisturbed.
QUIET_TOLERANCE = 0.10
#: With no stored floor, readings are taken for this long (seconds) first, so the first
#: measurement on a machine is not judged against a floor read in a disturbed moment.
CALIBRATION_S = 0.3
FLOOR_FILE = "slimsearch-probe-floor.json"


class MachineProbe:
    """Times the reference workload; knows the floor and whether a reading is undisturbed.

    ``workload`` and ``clock`` replace the real Linear layer and ``time.perf_counter`` (tests);
    ``lock_dir`` is where the floor file lives (default: the device locks' folder).
    """

    def __init__(self, threads: int, *, lock_dir: str | Path | None = None,
                 workload: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        if workload is None:
            generator = torch.Generator().manual_seed(0)
            layer = torch.nn.Linear(256, 256).eval()
            x = torch.randn(1, 256, generator=generator)
            workload = lambda: layer(x)  # noqa: E731
        self.workload = workload
        folder = Path(lock_dir or os.environ.get("SLIMSEARCH_LOCK_DIR", tempfile.gettempdir()))
        self.path = folder / FLOOR_FILE
        self.key = f"{cpu_model()} | threads {threads} | torch {torch.__version__}"
        self.floor_us = self._stored().get(self.key, float("inf"))
        self._improved = False
        self._last = float("inf")
        if self.floor_us == float("inf"):
            begin = self.clock()
            while self.clock() - begin < CALIBRATION_S:
                self.burst()

    def _stored(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def burst(self) -> float:
        """One reading: median microseconds per probe call; lowers the floor if it can."""
        times = []
        for _ in range(PROBE_CALLS):
            start = self.clock()
            self.workload()
            times.append((self.clock() - start) * 1e6)
        reading = statistics.median(times)
        # A new floor needs two readings in a row below the old one (it becomes the higher
        # of them): the floor only ever goes down, so one lucky reading must not set it.
        if reading < self.floor_us and self._last < self.floor_us:
            self.floor_us, self._improved = max(reading, self._last), True
        self._last = reading
        return reading

    def is_quiet(self, reading_us: float) -> bool:
        return reading_us <= self.floor_us * (1 + QUIET_TOLERANCE)

    def save(self) -> None:
        """Store a lowered floor for later processes (the lowest wins if two write at once)."""
        if not self._improved:
            return
        stored = self._stored()
        if self.floor_us < stored.get(self.key, float("inf")):
            stored[self.key] = self.floor_us
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, stored)
        self._improved = False
