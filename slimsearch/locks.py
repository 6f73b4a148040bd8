"""An exclusive lock on a file that slimsearch processes on one machine (or on a shared
filesystem) take in turn, with the maintained ``filelock`` package.

The device locks in ``devices`` (shared while computing, exclusive while timing, with a
turnstile) stay on ``fcntl`` directly: they need a shared mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout


@contextlib.contextmanager
def file_lock(path: str | Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing; its content is not kept)
    while the block runs. ``on_wait`` is called once if another process holds it, to say why
    nothing happens. The lock goes with the process if it dies."""
    # No soft (marker-file) fallback where flock is missing: such a lock would outlive a
    # process killed while holding it.
    lock = FileLock(str(path), fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
