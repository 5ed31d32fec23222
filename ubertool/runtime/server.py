"""The MCP server: exactly one tool, `python`, over stdio or streamable HTTP (fastmcp).

A call finds its session (`sessions.SessionManager`), runs the cell in it while sending
progress every second after the first, and answers with `reply.reply`. A failed cell is a tool
result with `isError`, never a protocol error; a client's cancellation stops the cell.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import anyio
from fastmcp import Context, FastMCP
from fastmcp.tools import ToolResult
from mcp.types import ToolAnnotations
from pydantic import Field

from ubertool import __version__
from ubertool.playbooks.dump import NAME
from ubertool.runtime.about import tool_description
from ubertool.runtime.journal import Journal
from ubertool.runtime.policy import Policy
from ubertool.runtime.reply import refusal, reply
from ubertool.runtime.runs import playbooks_home
from ubertool.runtime.sessions import SessionError, SessionManager
from ubertool.sandbox import SessionClosed

PROGRESS_AFTER_S = 1.0


def _connection_key(ctx: Context) -> str | None:
    """A stable name for the client's connection, when the transport has one."""
    if ctx.transport == "stdio":
        return "stdio"  # a stdio server process serves exactly one client
    request = ctx.request_context.request if ctx.request_context is not None else None
    header = request.headers.get("mcp-session-id") if request is not None else None
    return f"http:{header}" if header else None


def _traceparent(ctx: Context) -> str | None:
    meta = ctx.request_context.meta if ctx.request_context is not None else None
    value = (meta or {}).get("traceparent")
    return value if isinstance(value, str) else None


async def _progress(ctx: Context, timeout_s: float) -> None:
    """Tell the client the cell is alive, every second after the first, until cancelled."""
    started = time.monotonic()
    await anyio.sleep(PROGRESS_AFTER_S)
    while True:
        elapsed = time.monotonic() - started
        try:
            await ctx.report_progress(elapsed, total=timeout_s, message=f"running for {elapsed:.0f} s")
        except Exception:  # a client that went away must not stop the cell
            return
        await anyio.sleep(1.0)


def build_server(manager: SessionManager) -> FastMCP[Any]:
    """The FastMCP app whose one tool runs cells in `manager`'s sessions (which it must run)."""
    policy = manager.policy

    async def python(
        code: Annotated[str, Field(description="Python source to run in the session.")],
        ctx: Context,
        timeout_s: Annotated[float | None, Field(
            gt=0, description="This call's time limit in seconds (capped by the policy).")] = None,
        session: Annotated[str | None, Field(
            description="The session to continue, as named by an earlier result. "
                        "Leave it out to start one (over stdio, to use the connection's own).")] = None,
    ) -> ToolResult:
        try:
            handle, run = await manager.get(session, _connection_key(ctx))
        except SessionError as exc:
            return refusal(str(exc))
        timeout = run.timeout_for(timeout_s)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_progress, ctx, timeout)
            try:
                result = await run.cell(code, timeout_s=timeout, traceparent=_traceparent(ctx))
            except SessionClosed:
                return refusal(f"session {handle} was closed while this call waited. "
                               "Call again without `session` to start a new one.")
            finally:
                tg.cancel_scope.cancel()
        return reply(handle, result, run)

    server: FastMCP[Any] = FastMCP(
        "ubertool", version=__version__,
        instructions="One tool, `python`: a persistent Python sandbox. Read its description.")
    server.tool(python, name="python", description=tool_description(policy),
                annotations=ToolAnnotations(title="Python sandbox", readOnlyHint=False,
                                            destructiveHint=False, idempotentHint=False,
                                            openWorldHint=False))
    _add_playbook_resources(server)
    return server


def _add_playbook_resources(server: FastMCP[Any]) -> None:
    """Saved playbooks as resources: `playbook://index` lists them, `playbook://NAME` is one."""

    @server.resource("playbook://index", mime_type="application/json",
                     description="The playbooks saved with ubertool.save_playbook(), by name.")
    def playbook_index() -> str:
        folder = playbooks_home()
        names = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        return json.dumps({"playbooks": names, "folder": str(folder)})

    @server.resource("playbook://{name}", mime_type="text/x-python",
                     description="One saved playbook's Python source.")
    def playbook_source(name: str) -> str:
        if not NAME.match(name):
            raise ValueError(f"no playbook named {name!r}")
        path = playbooks_home() / f"{name}.py"
        if not path.is_file():
            raise ValueError(f"no playbook named {name!r}; playbook://index lists them")
        return path.read_text(encoding="utf-8")


async def serve(policy: Policy, transport: str, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until the transport ends (stdin closed, or the process is stopped)."""
    with Journal.default(policy.journal) as journal:
        async with SessionManager(policy, journal=journal).running() as manager:
            server = build_server(manager)
            if transport == "http":
                await server.run_async("http", show_banner=False, host=host, port=port)
            else:
                await server.run_async("stdio", show_banner=False)
