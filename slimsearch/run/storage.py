"""Where the study lives: a journal file inside the run folder, or any Optuna storage URL.

A URL is recorded and shown without its password: a password given in the URL moves into the
environment variable ``SLIMSEARCH_STORAGE_PASSWORD`` of this process (which its worker
processes inherit) and is put back only to connect. So run.json, the copied experiment, every
message and every worker's command line hold the URL without it; libpq's own ``PGPASSFILE``
or ``~/.pgpass`` keep it off the command line altogether.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from slimsearch.atomic import write_bytes
from slimsearch.errors import ConfigError

JOURNAL_FILE = "study.journal"
#: RDB storages (PostgreSQL, MySQL, SQLite): a running trial's worker writes a heartbeat this
#: often (seconds), and a trial whose heartbeat is older than GRACE_PERIOD_S is stale: its
#: worker died, on whatever machine (``recovery`` puts it right).
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180
#: The storage password for a URL that names a user but no password.
PASSWORD_ENV = "SLIMSEARCH_STORAGE_PASSWORD"


def public_url(url: str) -> tuple[str, str | None]:
    """``url`` as a run records it, and its password (None when it has none): a relative
    SQLite path made absolute (so the run opens the same database from any directory) and
    the password taken out."""
    if url.startswith("sqlite"):
        scheme, separator, rest = url.partition(":///")
        path, mark, query = rest.partition("?")
        if not separator or path in ("", ":memory:"):
            raise ConfigError(f"storage = {url!r}: an in-memory SQLite database ends with the "
                              "process; give a file, e.g. sqlite:///runs/db.sqlite3")
        url = f"{scheme}:///{Path(path).absolute()}{mark}{query}"
    return without_password(url)


def without_password(url: str) -> tuple[str, str | None]:
    """``url`` with its password taken out, and the password (None when it has none); parsed
    as Optuna's RDB storage parses it (SQLAlchemy), so both agree on what the password is."""
    parsed = _parse(url)
    if parsed is None or parsed.password is None:
        return url, None
    if "@" in (parsed.host or ""):
        raise ConfigError(f"storage = {mask(url, str(parsed.password))!r}: the URL has more than "
                          "one '@'; write an '@' inside the password as %40")
    return (parsed._replace(password=None).render_as_string(hide_password=False),
            str(parsed.password))


def shown(url: str) -> str:
    """``url`` as messages show it: with ``***`` where a password is used (given in the URL
    or by ``PASSWORD_ENV``)."""
    parsed = _parse(_connect_url(url))
    return mask(url) if parsed is None else parsed.render_as_string(hide_password=True)


def mask(text: str, password: str | None = None) -> str:
    """``text`` (a message) with what looks like a URL's password, and ``password``, as ``***``."""
    text = re.sub(r"([\w+.-]+://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)
    return text.replace(password, "***") if password else text


def _parse(url: str) -> Any:
    """SQLAlchemy's ``URL`` of ``url``, or None when it is not one (imported late: slow)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def _connect_url(url: str) -> str:
    """``url`` with the password from ``PASSWORD_ENV`` put in, where it names a user and a
    server but no password."""
    password = os.environ.get(PASSWORD_ENV)
    parsed = _parse(url) if password else None
    if parsed is None or parsed.password is not None or not parsed.username or not parsed.host:
        return url
    return parsed.set(password=password).render_as_string(hide_password=False)


def open_storage(run_dir: Path, url: str | None) -> BaseStorage:
    """The journal file ``run_dir/study.journal`` when ``url`` is None, else the storage at
    ``url`` (``sqlite:///...``, ``postgresql://...``, with Optuna's heartbeat), connected now
    so a bad URL fails early."""
    if url is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        journal = run_dir / JOURNAL_FILE
        if journal.is_file() and (repaired := repair_torn_tail(journal)):
            print(f"slimsearch: {repaired}", file=sys.stderr)
        return JournalStorage(JournalFileBackend(str(journal)))
    connect = _connect_url(url)
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(connect, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                                 grace_period=GRACE_PERIOD_S)
        storage.get_all_studies()  # forces a connection
    except Exception as exc:  # SQLAlchemy and drivers raise many types; all mean "cannot use it"
        reason = mask(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}",
                      os.environ.get(PASSWORD_ENV) or without_password(url)[1])
        raise ConfigError(f"storage = {shown(url)!r} cannot be opened: {reason}. Check the URL, "
                          "that the server runs, that its driver is installed and the password "
                          f"(in {PASSWORD_ENV}, PGPASSFILE or ~/.pgpass), or omit --storage to "
                          "use a journal file in the run folder") from None
    return storage


def check_storage_url(url: str) -> None:
    """Fail with a ``ConfigError`` now if ``url`` cannot be opened (nothing is created for
    server databases; a SQLite URL creates its file, which is what the user asked for)."""
    if url.startswith("sqlite"):
        folder = Path(url.partition(":///")[2].partition("?")[0]).parent
        if not folder.is_dir():
            raise ConfigError(f"storage = {url!r}: folder {str(folder)!r} does not exist; create "
                              "it first or point the URL elsewhere")
    open_storage(Path("."), url)


def repair_torn_tail(journal: Path) -> str | None:
    """Put right a journal whose last record was cut short (a power cut or a full disk in the
    middle of an append), before anything appends to it; return what was done, or None.

    Optuna reads past a torn last line, but the next record would be appended onto it and
    the glued line would then break every later read. A tail that is a whole record that
    only lost its newline gets it back; anything else is cut off and kept beside the
    journal (``study.journal.torn-<time>``). Done under the lock Optuna's appends take, so
    a record being written by a live process is never mistaken for a torn one."""
    if _ends_complete(journal):
        return None
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    try:
        with open(journal, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = _last_line_start(handle, size)
            handle.seek(start)
            tail = handle.read()
            if not tail or tail.endswith(b"\n"):  # an append finished meanwhile
                return None
            if _is_record(tail):
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                return (f"{journal}: its last record had lost its line end (the process writing "
                        "it stopped); restored it")
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            aside = write_bytes(journal.with_name(f"{journal.name}.torn-{stamp}"), tail)
            handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        lock.release()
    return (f"{journal}: its last record was cut short (the process writing it stopped, or "
            f"the disk was full); removed its {len(tail)} bytes (kept in {aside.name}); every "
            "complete record is intact")


def _ends_complete(journal: Path) -> bool:
    with open(journal, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if not size:
            return True
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


def _last_line_start(handle: BinaryIO, size: int, block: int = 1 << 16) -> int:
    """The offset just after the last newline of the file (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        handle.seek(start)
        chunk = handle.read(end - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
