"""Advisory file locks (``flock``) that several slimsearch processes on one machine share."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def file_lock(path: str | Path, *, shared: bool = False) -> Iterator[IO[str]]:
    """Hold an exclusive (or ``shared``) lock on ``path``, created if missing, while the block
    runs; yields the open file. The lock goes with the process if it dies."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
