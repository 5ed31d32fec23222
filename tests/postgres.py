"""A throwaway PostgreSQL server for tests: Debian's binaries, a cluster in a temporary folder,
on 127.0.0.1 at a free port, password (SCRAM) authentication over TCP, stopped at the end.

PostgreSQL refuses to run as root: as root it runs as the `postgres` user (`runuser`). Missing
binaries skip the tests only when not root; as root (CI) they are a failure that says what to
install (`.ci/system-deps` does it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import free_port

USER = "ubertool_test"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str
    folder: Path

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """A libpq URL for `database`, with the password in it (or `password` instead)."""
        return (f"postgresql://{USER}:{password if password is not None else self.password}"
                f"@127.0.0.1:{self.port}/{database}")

    def new_database(self) -> str:
        """A fresh, empty database; its name."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return name


def _as_server_user(args: list[str], owner: pwd.struct_passwd | None) -> list[str]:
    return ["runuser", "-u", owner.pw_name, "--", *args] if owner is not None else args


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a server; stop it and remove its folder on exit."""
    binaries = postgres_bin()
    root = os.geteuid() == 0
    if binaries is None:
        if not root:
            pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        pytest.fail("PostgreSQL is not installed: run `bash .ci/system-deps` (it installs postgresql)")
    owner = pwd.getpwnam("postgres") if root else None
    folder = Path(tempfile.mkdtemp(prefix="ubertool-pg-"))
    password = secrets.token_urlsafe(16)
    (folder / "pw").write_text(password + "\n")
    if owner is not None:
        for path in (folder, folder / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}

    def run(*args: str) -> None:
        subprocess.run(_as_server_user([str(binaries / args[0]), *args[1:]], owner), check=True,
                       env=env, capture_output=True, timeout=120, cwd=folder)

    try:
        run("initdb", "-D", str(data), "-U", USER, f"--pwfile={folder / 'pw'}", "-E", "UTF8",
            "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256")
        run("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(folder / "log"), "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
        yield Postgres(port, password, folder)
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
