"""Where the study lives: a journal file inside the run folder, or any Optuna storage URL."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from slimsearch.errors import ConfigError

JOURNAL_FILE = "study.journal"
#: RDB storages (PostgreSQL, MySQL, SQLite): a running trial's worker writes a heartbeat this
#: often (seconds), and a trial whose heartbeat is older than GRACE_PERIOD_S is stale: its
#: worker died, on whatever machine (``recovery`` puts it right).
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180


def open_storage(run_dir: Path, url: str | None) -> BaseStorage:
    """The journal file ``run_dir/study.journal`` when ``url`` is None, else the storage at
    ``url`` (``sqlite:///...``, ``postgresql://...``, with Optuna's heartbeat), connected now
    so a bad URL fails early."""
    if url is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(run_dir / JOURNAL_FILE)))
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                                 grace_period=GRACE_PERIOD_S)
        storage.get_all_studies()  # forces a connection
    except Exception as exc:  # SQLAlchemy and drivers raise many types; all mean "cannot use it"
        raise ConfigError(f"storage = {url!r} cannot be opened: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}. Check the URL, that the server runs and "
                          "that its driver is installed, or omit --storage to use a journal "
                          "file in the run folder") from exc
    return storage


def check_storage_url(url: str) -> None:
    """Fail with a ``ConfigError`` now if ``url`` cannot be opened (nothing is created for
    server databases; a SQLite URL creates its file, which is what the user asked for)."""
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"storage = {url!r}: folder {str(folder)!r} does not exist; create "
                              "it first or point the URL elsewhere")
    open_storage(Path("."), url)
