"""A private, throwaway PostgreSQL server for the tests that need a real one (the store, the control plane).

Started once per test session from the Debian `postgresql` package that `.ci/run` installs; under `CI=true` a
missing server fails the tests instead of skipping them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

INSTALL_HINT = "PostgreSQL is not installed: `apt-get install -y postgresql` (the store tests need a real server)"


# A private PostgreSQL cluster for this test session


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a folder under /tmp, on a Unix socket only, trusting local users.

    PostgreSQL refuses to run as root, so when the tests run as root its commands run as the `postgres` user.
    """

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.as_postgres: list[str] = []
        self.base = Path(tempfile.mkdtemp(prefix="servelet-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data = self.base / "data"
        self.log = self.base / "server.log"

    def _run(self, tool: str, *args: str) -> None:
        command = [*self.as_postgres, str(self.bin_dir / tool), *args]
        done = subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{log}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--locale=C", "-E", "UTF8", "--no-sync")
        # Socket only (listen_addresses=''), in our own folder; durability off: the data dies with the session.
        options = f"-k {self.base} -p {self.port} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.base}&port={self.port}"

    def admin(self, sql: str) -> None:
        import psycopg

        address = {"host": str(self.base), "port": self.port, "user": "postgres", "dbname": "postgres"}
        with psycopg.connect(**address, autocommit=True) as conn:
            conn.execute(sql)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [b for b in found if (b / "pg_ctl").exists() and b.parent.name.isdigit()]
    return max(found, key=lambda b: int(b.parent.name), default=None)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server."""
    bin_dir = _postgres_bin()
    problem = None
    if bin_dir is None:
        problem = INSTALL_HINT
    elif os.geteuid() == 0 and (shutil.which("runuser") is None or not _has_user("postgres")):
        problem = f"{INSTALL_HINT}: running as root needs the `postgres` user and `runuser`"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    cluster = PostgresCluster(bin_dir)
    cluster.start()
    yield cluster
    cluster.stop()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False



def new_database(cluster: PostgresCluster) -> tuple[str, str]:
    """(name, SQLAlchemy URL) of a new, empty database on the cluster."""
    name = f"servelet_{uuid.uuid4().hex[:12]}"
    cluster.admin(f"CREATE DATABASE {name}")
    return name, cluster.url(name)
