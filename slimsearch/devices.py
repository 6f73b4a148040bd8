"""Which device a name means, and an exclusive lock per device for timing on it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"cuda-{uuid}" if uuid is not None else f"cuda-{index}"


@contextlib.contextmanager
def exclusive(device: torch.device, *, lock_dir: str | Path | None = None) -> Iterator[None]:
    """Hold a machine-wide lock for ``device`` so no two measurements time on it at once.

    One lock file per device (all CPU cores count as one device): a run's other workers,
    and other runs on this machine, wait here instead of skewing each other's latency.
    """
    folder = Path(lock_dir or os.environ.get("SLIMSEARCH_LOCK_DIR", tempfile.gettempdir()))
    folder.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]", "_", device_identity(device))
    with open(folder / f"slimsearch-latency-{tag}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
