"""A real PostgreSQL server for the tests, from Debian's binaries, on a Unix socket only.

One server per test session (``initdb`` into a temporary directory, ``pg_ctl start`` with no
TCP listener), one new database per test. As root, the server runs as Debian's ``postgres``
user: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"


def find_binaries() -> Path | None:
    """The newest Debian PostgreSQL's bin directory with initdb and pg_ctl, or None."""
    found = [
        bin_dir
        for bin_dir in Path("/").glob(BIN_GLOB.lstrip("/"))
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()
    ]
    found.sort(key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)
    return found[-1] if found else None


class PostgresServer:
    """A throwaway cluster: :meth:`start` it, take :meth:`new_database` URLs, :meth:`stop` it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        # A short path: the socket's name must fit in sun_path.
        self.base = Path(tempfile.mkdtemp(prefix="rcli-pg-"))
        self.data = self.base / "data"
        self._names = itertools.count()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.base, self._user.pw_uid, self._user.pw_gid)

    def _run(self, *argv: str) -> None:
        user = self._user
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            cwd=self.base,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )

    def start(self) -> None:
        """Create the cluster and start it; raise CalledProcessError with its log otherwise."""
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = f"-k {self.base} -c listen_addresses='' -F -c max_connections=200"
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.base / "log"),
            "-w",
            "start",
        )

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database``, over the Unix socket."""
        return f"postgresql://postgres@/{database}?host={self.base}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")  # a name of ours
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once and delete its files."""
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
