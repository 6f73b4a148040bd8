"""Which device a name means, and the locks that keep latency measurements undisturbed."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from slimsearch.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; checks that a CUDA index exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"target.device = {name!r}, but this machine has no CUDA device "
                              "(or this torch is a CPU build); use 'cpu' or 'auto'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"target.device = {name!r}, but only {torch.cuda.device_count()} "
                              "CUDA device(s) exist")
    return device


def device_identity(device: torch.device) -> str:
    """A name for the physical device: ``cpu``, or ``cuda-<uuid>`` so that ``cuda``, ``cuda:0``
    and a remapped ``CUDA_VISIBLE_DEVICES`` index of the same GPU all agree."""
    if device.type != "cuda":  # the CPU model and core count: a resumed run on another
        return f"cpu-{cpu_model()}-{os.cpu_count()}"  # machine must not mix its figures
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"cuda-{uuid}" if uuid is not None else f"cuda-{index}"


def _lock_file(device: torch.device, lock_dir: str | Path | None, kind: str) -> Path:
    folder = Path(lock_dir or os.environ.get("SLIMSEARCH_LOCK_DIR", tempfile.gettempdir()))
    folder.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]", "_", device_identity(device))
    return folder / f"slimsearch-{kind}-{tag}.lock"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows. Read once per
    process: it names lock files, and training asks for those between every two epochs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: the turnstile, which ``step_aside`` also tries
    without blocking on its own handle (so it stays on fcntl, as the device lock does)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class _Held:
    handle: IO[str]
    mode: str  # "shared" (computing) or "exclusive" (timing)


#: The device locks this process holds, by lock file. flock locks belong to an open file, so
#: a second open of the same file would wait on this process's own lock: nested calls reuse
#: (and convert) the one handle instead.
_held: dict[Path, _Held] = {}


@contextlib.contextmanager
def computing(device: torch.device, *, lock_dir: str | Path | None = None) -> Iterator[None]:
    """Mark work (training, evaluation) that loads ``device``: any number of processes may
    compute at once, but never while a latency measurement on the device runs (``exclusive``).

    A process waiting to measure goes first: new work queues behind it at a turnstile, so a
    stream of computations cannot starve a measurement.
    """
    path = _lock_file(device, lock_dir, "device")
    if path in _held:  # already computing or timing in this process
        yield
        return
    with open(path, "a+") as handle:
        with _flock(_lock_file(device, lock_dir, "turnstile")):
            pass
        fcntl.flock(handle, fcntl.LOCK_SH)
        _held[path] = _Held(handle, "shared")
        try:
            yield
        finally:
            del _held[path]
            fcntl.flock(handle, fcntl.LOCK_UN)


def step_aside(device: torch.device, *, lock_dir: str | Path | None = None) -> None:
    """Called by a long computation at safe points (between training epochs): when another
    process is waiting to time ``device``, let it, and go on once its measurement is done.

    Without this a measurement would wait for the other trial's whole build; with it, for at
    most one epoch. A no-op outside ``computing`` or when nobody waits."""
    path = _lock_file(device, lock_dir, "device")
    held = _held.get(path)
    if held is None or held.mode != "shared":
        return
    turnstile = _lock_file(device, lock_dir, "turnstile")
    with open(turnstile, "a+") as gate:
        try:
            fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # someone is at the turnstile: a measurement waiting for the device
        else:
            fcntl.flock(gate, fcntl.LOCK_UN)
            return
    fcntl.flock(held.handle, fcntl.LOCK_UN)
    with _flock(turnstile):  # through once the measurement has the device
        pass
    fcntl.flock(held.handle, fcntl.LOCK_SH)  # back once it is done


def wait_apart(device: torch.device, seconds: float, *,
               lock_dir: str | Path | None = None) -> None:
    """Sleep ``seconds`` without holding ``device`` (a measurement waiting for a quieter
    moment): inside ``computing``, its shared hold is let go meanwhile, so other processes'
    measurements and training go on, and taken again after."""
    path = _lock_file(device, lock_dir, "device")
    held = _held.get(path)
    if held is None or held.mode != "shared":
        time.sleep(seconds)
        return
    fcntl.flock(held.handle, fcntl.LOCK_UN)
    try:
        time.sleep(seconds)
    finally:
        fcntl.flock(held.handle, fcntl.LOCK_SH)


@contextlib.contextmanager
def exclusive(device: torch.device, *, lock_dir: str | Path | None = None) -> Iterator[None]:
    """Hold ``device`` alone while timing on it: no other measurement and no other local
    trial's computation runs on it meanwhile (both skew latency: two trials on 2 cores biased
    it 2x while the spread still looked tight).

    One lock per device (all CPU cores count as one device; a GPU by its uuid), shared by every
    run on this machine. Called inside ``computing`` of this process, it turns that lock into
    the exclusive one for the measurement and back into a shared one after.
    """
    path = _lock_file(device, lock_dir, "device")
    outer = _held.get(path)
    if outer is not None and outer.mode == "exclusive":
        yield
        return
    with contextlib.ExitStack() as stack:
        handle = outer.handle if outer else stack.enter_context(open(path, "a+"))
        if outer:  # let others' waiting measurements and computations see we stopped computing
            fcntl.flock(handle, fcntl.LOCK_UN)
        with _flock(_lock_file(device, lock_dir, "turnstile")):
            fcntl.flock(handle, fcntl.LOCK_EX)
        _held[path] = _Held(handle, "exclusive")
        try:
            yield
        finally:
            if outer:
                fcntl.flock(handle, fcntl.LOCK_SH)  # back to computing (waits if a measurement slipped in)
                _held[path] = outer
            else:
                del _held[path]
                fcntl.flock(handle, fcntl.LOCK_UN)


def free_memory(device: torch.device) -> None:
    """Return what a finished or failed trial held: Python's cycles, and on CUDA the
    allocator's cached blocks, so the next trial starts from an empty device (an
    out-of-memory trial does not make the next one fail too)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
