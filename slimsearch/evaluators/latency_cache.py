"""Latency measured once per executed form in a run.

Trials often execute the same thing: unstructured sparsity folded into dense weights, or
another bit width on the same float or int8 kernels, leaves every layer's type, shape and
kernel unchanged. Their latency is the same quantity, so it is measured once and reused,
keyed by ``Executable.signature`` (runtime, device, dtype, batch, threads and every layer's
type, shape, kernel and tensor layout). The cache is a JSON file in the run folder, shared by
the run's workers and kept across resumes; hits and misses are counted per process.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from slimsearch.atomic import write_json
from slimsearch.locks import file_lock
from slimsearch.timing.latency import Latency


class LatencyCache:
    """Latency by executed-form signature, persisted in ``path`` (None: in memory only)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            yield

    def _read(self) -> dict[str, dict]:
        if self.path is None or not self.path.is_file():
            return self._memory
        try:
            return json.loads(self.path.read_text())
        except ValueError:  # unreadable: measure again rather than fail the trial
            return {}

    def get(self, key: str) -> Latency | None:
        """The latency stored under ``key``, counting a hit, or None, counting a miss."""
        with self._locked():
            found = self._read().get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return Latency.from_dict(found)

    def put(self, key: str, latency: Latency) -> None:
        with self._locked():
            entries = dict(self._read())
            entries[key] = asdict(latency)
            if self.path is None:
                self._memory = entries
            else:
                write_json(self.path, entries)

    @property
    def hit_rate(self) -> float | None:
        """Fraction of lookups answered from the cache in this process (None before any)."""
        total = self.hits + self.misses
        return self.hits / total if total else None
