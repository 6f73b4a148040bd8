"""Shared fixtures: the built-in digits-mlp task (small, bundled with scikit-learn, no download)
and a real PostgreSQL server started for the session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimsearch.tasks import Task, make_task


@pytest.fixture(scope="session")
def digits_mlp_task() -> Task:
    """``make_task("digits-mlp", seed=0)``, built once per test session; treat it as read-only."""
    return make_task("digits-mlp", seed=0)


def _postgres_programs() -> Path | None:
    """The folder of PostgreSQL's server programs: on PATH, or where Debian puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)  # 9 < 16
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server of our own on loopback for the test session, in a temporary
    folder (trust authentication, a free port); yields its URL without a database name."""
    programs = _postgres_programs()
    if programs is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed; .ci/run "
                    "installs Debian's postgresql package")
    folder = Path(tempfile.mkdtemp(prefix="slimsearch-postgres-"))
    # The server refuses to run as root: there, it runs as the package's postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    def run(*command: str) -> None:  # a failure shows the server's own words
        done = subprocess.run([*as_user, *command], capture_output=True, text=True)
        if done.returncode != 0:
            log = folder / "server.log"
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr}{done.stdout}"
                               + (log.read_text() if log.exists() else ""))

    run(str(programs / "initdb"), "-D", str(data), "-U", "slimsearch", "--auth=trust", "-E", "UTF8")
    run(str(programs / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        yield f"postgresql://slimsearch@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(programs / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's PostgreSQL server, as a storage URL."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    # autocommit: CREATE DATABASE cannot run inside a transaction
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"
