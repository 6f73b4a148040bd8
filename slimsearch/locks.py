"""Advisory file locks (``flock``) that several slimsearch processes on one machine share."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def file_lock(path: str | Path, *, shared: bool = False,
              on_wait: Callable[[], None] | None = None) -> Iterator[IO[str]]:
    """Hold an exclusive (or ``shared``) lock on ``path``, created if missing, while the block
    runs; yields the open file. ``on_wait`` is called once if another process holds it (to say
    why nothing happens). The lock goes with the process if it dies."""
    with open(path, "a+") as handle:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, mode)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
