"""A real PostgreSQL server for the tests, from Debian's `postgresql` package: initdb and pg_ctl in
a temporary folder, trust authentication, on 127.0.0.1 at a free port, its socket in that folder.
initdb refuses to run as root, so as root the server runs as the package's `postgres` user."""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional


def binaries() -> Optional[Path]:
    """The folder of initdb and pg_ctl: on the PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return Path(folders[-1]) if folders and Path(folders[-1], "initdb").exists() else None


class PostgresServer:
    """start() → None, or the reason it could not start; url(database); new_database(); stop()."""

    def __init__(self) -> None:
        self.folder: Optional[Path] = None
        self.port = 0
        self._user: Optional[pwd.struct_passwd] = None
        self._names = itertools.count(1)

    def start(self) -> Optional[str]:
        bin_folder = binaries()
        if bin_folder is None:
            return "PostgreSQL is not installed (apt-get install postgresql): no initdb or pg_ctl found"
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                return "running as root, and there is no `postgres` user for initdb (which refuses root)"
        self.folder = Path(tempfile.mkdtemp(prefix="embedding-lab-pg-"))
        data = self.folder / "data"
        if self._user is not None:
            os.chown(self.folder, self._user.pw_uid, self._user.pw_gid)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        log = self.folder / "server.log"
        steps = [
            [str(bin_folder / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
             "--no-sync"],
            [str(bin_folder / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "start", "-o",
             f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off -c synchronous_commit=off "
             "-c full_page_writes=off -c max_connections=200"],
        ]
        for command in steps:
            done = self._run(command)
            if done.returncode != 0:
                tail = log.read_text()[-1500:] if log.exists() else ""
                return f"the PostgreSQL server did not start: {' '.join(command[:1])} said {done.stdout[-1500:]} {tail}"
        return None

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        # as root: as the postgres user, without root's groups (initdb and the server refuse root)
        as_postgres = {} if self._user is None else {
            "user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
                              cwd=self.folder, env=dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8"), **as_postgres)

    def url(self, database: str = "postgres", scheme: str = "postgresql") -> str:
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL (plain postgresql://, as users write it)."""
        import psycopg

        name = f"lab_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Remove a database new_database made, closing what is still connected to it (a worker
        process a test left behind)."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.folder is None:
            return
        bin_folder = binaries()
        if bin_folder is not None and (self.folder / "data" / "postmaster.pid").exists():
            self._run([str(bin_folder / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None
