"""The MCP server through real clients: fastmcp's Client and the official `mcp` SDK, over stdio
(the server as a subprocess) and streamable HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import cli_env, ubertool_command
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from mcp.types import ImageContent, TextContent
from opentelemetry import context, propagate
from servers import start_http_server

pytestmark = pytest.mark.anyio


def stdio(*args: str) -> StdioTransport:
    return StdioTransport(ubertool_command(), ["serve", *args], env=cli_env())


@pytest.fixture(params=["stdio", "http"])
async def client(request: pytest.FixtureRequest, serve_http: Callable[..., str]) -> AsyncIterator[Client]:
    target: Any = stdio() if request.param == "stdio" else serve_http()
    async with Client(target, timeout=120) as c:
        yield c


class Python:
    """Calls the one tool, passing back the session the first result named."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.session: str | None = None

    async def __call__(self, code: str, **args: Any) -> Any:
        arguments: dict[str, Any] = {"code": code, **args}
        if self.session is not None:
            arguments.setdefault("session", self.session)
        result = await self.client.call_tool("python", arguments, raise_on_error=False)
        if result.structured_content and "session" in result.structured_content:
            self.session = result.structured_content["session"]
        return result


def text(result: Any) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


async def test_exactly_one_tool_with_a_helpful_description(client: Client) -> None:
    tools = await client.list_tools()
    assert [tool.name for tool in tools] == ["python"]
    (tool,) = tools
    assert "State is kept between calls" in (tool.description or "")
    assert "/workspace: writable" in (tool.description or "")
    assert "no network" in (tool.description or "")
    assert tool.input_schema["required"] == ["code"]
    assert set(tool.input_schema["properties"]) == {"code", "timeout_s", "session"}


async def test_state_error_timeout_and_restore(client: Client) -> None:
    python = Python(client)
    first = await python("x = 41\nimport math")
    assert not first.is_error and first.structured_content["status"] == "ok"
    assert first.structured_content["session"].startswith("s-")
    second = await python("x + 1")
    assert text(second).startswith("42\n")
    assert second.structured_content["value"] == "42" and second.structured_content["cell"] == 2

    failed = await python("print('partial')\nmath.sqrt(-1)")
    assert failed.is_error
    assert failed.structured_content["error"]["type"] == "ValueError"
    assert "partial" in text(failed) and 'File "<cell-3>", line 2' in text(failed)

    stopped = await python("import time\ntime.sleep(100)", timeout_s=0.5)
    assert stopped.is_error and stopped.structured_content["status"] == "timeout"
    # Replayed: the 3 earlier cells, or fewer when the session kept an image after a slow one.
    assert stopped.structured_content["restored"]["ok"]
    assert stopped.structured_content["restored"]["cells"] <= 3
    assert "state restored: " in text(stopped)
    after = await python("x")
    assert after.structured_content["value"] == "41"


async def test_images_come_back_as_image_content(client: Client) -> None:
    python = Python(client)
    result = await python("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()")
    assert not result.is_error
    images = [block for block in result.content if isinstance(block, ImageContent)]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
    assert result.structured_content["images"] == 1


async def test_cancelling_a_call_stops_its_cell(client: Client) -> None:
    python = Python(client)
    await python("kept = 'yes'")
    with anyio.move_on_after(1.5):
        await python("while True: pass", timeout_s=60)
    with anyio.fail_after(20):  # had the loop not been stopped, this would wait 60 s behind it
        after = await python("kept")
    assert after.structured_content["value"] == "'yes'"


async def test_malformed_arguments_get_clear_errors_and_the_server_stays_up(client: Client) -> None:
    for arguments, expected in [({}, "code"), ({"code": 3}, "valid string"),
                                ({"code": "1", "timeout_s": "soon"}, "timeout_s"),
                                ({"code": "1", "timeout_s": -1}, "greater than 0"),
                                ({"code": "1", "bogus": True}, "bogus")]:
        result = await client.call_tool("python", arguments, raise_on_error=False)
        assert result.is_error, arguments
        assert expected in text(result), (arguments, text(result))
    huge = await client.call_tool("python", {"code": "#" * (2 * 2**20)}, raise_on_error=False)
    assert huge.is_error and huge.structured_content["status"] == "denied"
    assert "over the policy's cap of 1048576 bytes" in text(huge)
    unknown = await client.call_tool("python", {"code": "1", "session": "s-nope"}, raise_on_error=False)
    assert unknown.is_error and "no open session 's-nope'" in text(unknown)
    ok = await client.call_tool("python", {"code": "6 * 7"}, raise_on_error=False)
    assert ok.structured_content["value"] == "42"


async def test_long_output_is_cut_and_saved_in_the_workspace(client: Client) -> None:
    python = Python(client)
    result = await python("print('x' * 50_000 + 'END')")
    saved = result.structured_content["saved"]["stdout"]
    assert saved == "/workspace/.ubertool/cell-1-stdout.txt"
    assert f"bytes not shown; all of it is in {saved}" in text(result)
    assert len(text(result)) < 25_000
    whole = await python(f"len(open({saved!r}).read())")
    assert whole.structured_content["value"] == str(50_000 + 3 + 1)


async def test_progress_is_sent_while_a_cell_runs(serve_http: Callable[..., str]) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total, message))

    async with Client(serve_http(), progress_handler=progress) as c:
        result = await c.call_tool("python", {"code": "import time\ntime.sleep(2.5)", "timeout_s": 10})
    assert not result.is_error
    assert len(seen) >= 1
    assert seen[0][1] == 10.0 and seen[0][2] == "running for 1 s"


async def test_two_sessions_never_see_each_other(serve_http: Callable[..., str]) -> None:
    url = serve_http()
    async with Client(url) as one, Client(url) as two:
        a, b = Python(one), Python(two)
        await a("secret = 'only in a'\nopen('/workspace/a.txt', 'w').write('a')")
        await b("mine = 'only in b'")
        assert a.session != b.session
        seen = await b("import os\n'secret' in globals(), os.listdir('/workspace')")
        assert seen.structured_content["value"] == "(False, [])"
        gone = await a("import os\n'mine' in globals(), os.listdir('/workspace')")
        assert gone.structured_content["value"] == "(False, ['a.txt'])"
        # Concurrent cells in two sessions run side by side.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a, "import time\ntime.sleep(1.5)")
                tg.start_soon(b, "import time\ntime.sleep(1.5)")


async def test_idle_sessions_are_closed(serve_http: Callable[..., str], tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\nsession_idle_s = 1.0\n")
    async with Client(serve_http("--policy", str(policy))) as c:
        python = Python(c)
        await python("x = 1")
        await anyio.sleep(2.5)
        late = await python("x")
        assert late.is_error and f"no open session {python.session!r}: it expired" in text(late)


async def test_audit_log_records_cells_with_traceparent(client: Client, _isolated_home: Path) -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    # Also the current context: a client with an OpenTelemetry SDK installed (as after
    # test_telemetry, in this process) sends its own span of that trace in place of ours.
    token = context.attach(propagate.extract({"traceparent": trace}))
    try:
        await client.call_tool("python", {"code": "y = 2"}, meta={"traceparent": trace})
    finally:
        context.detach(token)
    # The session's run (a server also keeps a run opened ahead of need: `[sessions] pool`).
    (log,) = [p for p in (_isolated_home / "runs").glob("*/audit.jsonl") if "session_open" in p.read_text()]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[:4] == ["run_start", "session_open", "cell_start", "cell_end"]
    start, end = events[2], events[3]
    assert start["traceparent"] == end["traceparent"]
    assert start["traceparent"].split("-")[1] == trace.split("-")[1]  # the client's trace
    assert start["code"].startswith("sha256:") and "y = 2" not in log.read_text()
    assert end["status"] == "ok" and end["cell"] == 1


async def test_an_answered_cell_is_in_the_journal_when_the_server_is_killed(_isolated_home: Path) -> None:
    # The journal commits before the answer, without an fsync (synchronous=NORMAL): what was
    # answered must survive the process dying at once (SIGKILL: no handler, no cleanup runs).
    proc, url = start_http_server(ubertool_command(), cli_env())
    try:
        async with Client(url) as client:
            answered = await client.call_tool("python", {"code": "answer = 41 + 1\nanswer"})
            assert answered.structured_content["value"] == "42"
            proc.kill()
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    with contextlib.closing(sqlite3.connect(_isolated_home / "journal.sqlite")) as db:
        rows = db.execute("SELECT code, status, value FROM cells").fetchall()
    assert rows == [("answer = 41 + 1\nanswer", "ok", "42")]


async def test_official_sdk_client_over_stdio(tmp_path: Path) -> None:
    from mcp import Client as SdkClient
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(command=ubertool_command(), args=["serve"], env=cli_env())
    async with SdkClient(params) as sdk:
        tools = await sdk.list_tools()
        assert [tool.name for tool in tools.tools] == ["python"]
        await sdk.call_tool("python", {"code": "n = 20"})
        result = await sdk.call_tool("python", {"code": "n + 22"})
        assert not result.is_error
        assert result.structured_content is not None and result.structured_content["value"] == "42"


async def test_official_sdk_legacy_http_keeps_state_by_mcp_session_id(
        serve_http: Callable[..., str]) -> None:
    from mcp import Client as SdkClient

    async with SdkClient(serve_http(), mode="legacy") as sdk:
        await sdk.call_tool("python", {"code": "n = 1"})
        result = await sdk.call_tool("python", {"code": "n + 1"})
        assert result.structured_content is not None and result.structured_content["value"] == "2"


async def test_the_description_and_about_name_everything_the_policy_gives(tmp_path: Path) -> None:
    """An agent is told of every folder and host tool the policy grants, and nothing else."""
    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "[[grants]]\nhost = 'data'\nguest = '/data'\n"
        "[[mounts]]\nkind = 'dir'\nname = 'out'\nhost = 'out'\nguest = '/out'\nwritable = true\n"
        "[[mounts]]\nkind = 'http'\nname = 'sales'\nguest = '/remote/sales'\n"
        "base_url = 'https://api.example.com/v1'\nlisting = { index = 'index.json' }\n"
        "[tools.programs.sqlite]\nargv = ['sqlite3', '-safe']\n"
        "[tools.browser]\norigins = ['http://127.0.0.1:8080']\n"
        "[tools.mcp.tracker]\ncommand = ['python', 'tracker.py']\nallow = ['search_*']\n")
    async with Client(stdio("--policy", str(policy)), timeout=120) as client:
        (tool,) = await client.list_tools()
        about = await client.call_tool("python", {"code": "import ubertool\nubertool.about()"})
        listing = "import os\nsorted(os.listdir('/')), os.listdir('/remote')"
        listed = await client.call_tool("python", {"code": listing})
        assert "['data', 'home', 'out', 'remote', 'tmp', 'usr', 'workspace'], ['sales']" in text(listed)
    for said in (tool.description or "", text(about)):
        assert "- /data: read-only host folder" in said
        assert "- /out: host folder 'out', writable" in said
        assert ("- /remote/sales: remote resource 'sales' (files are fetched from https://api.example.com; "
                "read-only; folders are listed from their index.json)") in said
        assert "- ubertool.programs: sqlite" in said
        assert "- ubertool.browser: a browser for http://127.0.0.1:8080" in said
        assert "- ubertool.mcp: tools of tracker" in said
    async with Client(stdio(), timeout=120) as client:
        (tool,) = await client.list_tools()
    assert "Host tools" not in (tool.description or "") and "/remote" not in (tool.description or "")
