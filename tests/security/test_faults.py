"""Faults around the sandbox: the server killed mid-cell, a journal that is full."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import pytest
from conftest import cli_env, ubertool_command
from fastmcp import Client
from servers import free_port, start_http_server

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import default_policy
from ubertool.runtime.runs import open_run
from ubertool.sandbox import Status

pytestmark = pytest.mark.anyio


def start_server(port: int, home: Path) -> subprocess.Popen[bytes]:
    return start_http_server(ubertool_command(), {**cli_env(), "UBERTOOL_HOME": str(home)}, port=port)[0]


async def test_server_killed_mid_cell_then_restarted(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    server = start_server(port, tmp_path)
    try:
        handle = ""

        async def kill_soon() -> None:
            await anyio.sleep(1.0)
            server.send_signal(signal.SIGKILL)

        with pytest.raises(Exception):  # noqa: B017 - the transport's own error, whatever it is
            async with Client(url, timeout=30) as client:
                first = await client.call_tool("python", {"code": "kept = 41"})
                handle = first.structured_content["session"]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_soon)
                    await client.call_tool("python", {"code": "while True: pass", "session": handle,
                                                      "timeout_s": 30})
        server.wait(timeout=30)
        server = start_server(port, tmp_path)
        async with Client(url, timeout=30) as client:
            gone = await client.call_tool("python", {"code": "kept", "session": handle}, raise_on_error=False)
            assert gone.is_error
            text = gone.content[0].text
            assert text.startswith(f"no open session {handle!r}: it expired")
            assert "the server restarted" in text and "ubertool sessions dump" in text
            fresh = await client.call_tool("python", {"code": "6 * 7"})
            assert fresh.structured_content["value"] == "42"
        # The finished cell outlived the crash in the journal.
        listed = subprocess.run([ubertool_command(), "sessions", "list"], capture_output=True, text=True,
                                env={**cli_env(), "UBERTOOL_HOME": str(tmp_path)}, timeout=60).stdout
        assert handle in listed
    finally:
        server.terminate()
        server.wait(timeout=30)


async def test_a_full_journal_does_not_lose_the_cell(_isolated_home: Path) -> None:
    with Journal(default_journal_path()) as journal:
        async with open_run(default_policy(), journal=journal) as run:
            assert (await run.cell("x = 1")).status is Status.OK
            pages = journal.db.execute("PRAGMA page_count").fetchone()[0]
            journal.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite now answers "full"
            result = await run.cell("print('x' * 100000)\n42")
            assert result.status is Status.OK and str(result.value) == "42"
            assert result.notes and result.notes[-1].startswith("the journal could not record this cell (")
            assert "full" in result.notes[-1]
            assert str((await run.cell("x + 1")).value) == "2"
