"""Where the study lives: a journal file inside the run folder, or any Optuna storage URL."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from slimsearch.errors import ConfigError

JOURNAL_FILE = "study.journal"


def open_storage(run_dir: Path, url: str | None) -> BaseStorage:
    """The journal file ``run_dir/study.journal`` when ``url`` is None, else the storage at
    ``url`` (``sqlite:///...``, ``postgresql://...``), connected now so a bad URL fails early."""
    if url is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(run_dir / JOURNAL_FILE)))
    try:
        storage = optuna.storages.get_storage(url)
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
