"""Is the CPU undisturbed right now? A fixed reference workload, timed between the windows of
a latency measurement, answers it.

On a shared machine the same model runs ~1.55x slower for seconds at a time while something
outside this process loads the physical core (measured on the reference 2-core VM:
``benchmarks/RESULTS.md``). Inside such a period the samples stay tightly grouped, so no
statistic of the samples alone can tell a slow period from a slow model. The probe, a fixed
small workload, slows down with it. Not every workload slows alike, so there are two: a
256x256 Linear layer on one sample (``linear``, 6-11 us undisturbed there, as the VM's speed
changed from day to day) for models without convolutions, and a 16-channel 3x3 Conv2d on
16x16 (``conv``, 28-35 us) for models with them. Replayed over the same disturbed windows,
the CNN's slowdown was 1.115x the Linear probe's and 0.99x the conv probe's; the MLP's was
0.92-1.08x the Linear probe's, from one day to the next (benchmarks/RESULTS.md).

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

#: Probe calls per burst, by kind; the burst's median is one reading (~0.1-0.2 ms of probe
#: per reading, against 5 ms windows of samples).
PROBE_CALLS = {"linear": 10, "conv": 5}
KINDS = tuple(PROBE_CALLS)
#: A reading at most this fraction above the floor counts as undisturbed. The disturbance
#: that slows models on the reference VM slows the probe 1.45-1.9x; the probe alone also reads
#: 1.05-1.20x for seconds while the models keep their speed (260 CNN measurements: model
#: windows at 0.98-1.01x of normal whenever the probe read under 1.2x, and 1.49-1.50x when it
#: read over 1.5x). At 0.10, 16 of those 260 were judged disturbed and scaled 10% low.
QUIET_TOLERANCE = 0.20
#: With no stored floor, readings are taken for this long (seconds) first, so the first
#: measurement on a machine is not judged against a floor read in a disturbed moment.
CALIBRATION_S = 0.3
FLOOR_FILE = "slimsearch-probe-floor.json"


def kind_for(model: object) -> str:
    """The probe that slows down most like ``model``: ``conv`` when it has convolutions."""
    if isinstance(model, torch.nn.Module) and any(
            isinstance(m, torch.nn.modules.conv._ConvNd) or "Conv" in type(m).__name__
            for m in model.modules()):
        return "conv"
    return "linear"


def _workload(kind: str) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(0)
    if kind == "conv":
        layer: torch.nn.Module = torch.nn.Conv2d(16, 16, 3, padding=1).eval()
        x = torch.randn(1, 16, 16, 16, generator=generator)
    else:
        layer = torch.nn.Linear(256, 256).eval()
        x = torch.randn(1, 256, generator=generator)
    return lambda: layer(x)


class MachineProbe:
    """Times the reference workload; knows the floor and whether a reading is undisturbed.

    ``kind``: ``linear`` or ``conv`` (see ``kind_for``). ``workload`` and ``clock`` replace the
    real layer and ``time.perf_counter`` (tests); ``lock_dir`` is where the floor file lives
    (default: the device locks' folder).
    """

    def __init__(self, threads: int, *, kind: str = "linear",
                 lock_dir: str | Path | None = None,
                 workload: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if kind not in KINDS:
            raise ValueError(f"probe kind {kind!r}: one of {KINDS}")
        self.clock = clock
        self.kind = kind
        self.calls = PROBE_CALLS[kind]
        self.workload = workload or _workload(kind)
        folder = Path(lock_dir or os.environ.get("SLIMSEARCH_LOCK_DIR", tempfile.gettempdir()))
        self.path = folder / FLOOR_FILE
        self.key = f"{cpu_model()} | threads {threads} | torch {torch.__version__}"
        if kind != "linear":  # the Linear probe's key predates the kinds: kept as it was
            self.key += f" | probe {kind}"
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
        for _ in range(self.calls):
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
