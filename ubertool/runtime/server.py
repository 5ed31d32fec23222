"""The MCP server: exactly one tool, `python`, over stdio or streamable HTTP (fastmcp).

A call goes to its principal's session through a `manager.Sessions` (in this process,
`sessions.SessionManager`; with `--cluster`, `cluster.RaySessions`), which runs the cell while
the server sends progress every second after the first, and answers with `reply.reply`. A failed cell is
a tool result with `isError`, never a protocol error; a client's cancellation, or closing its
HTTP stream, stops the cell. Over HTTP the front door (`frontdoor`) checks Host, Origin and the
bearer token first. SIGINT and SIGTERM stop the server cleanly: the cells in flight are stopped
and answered `cancelled` ("the server is stopping"), every run is ended in the journal, and
`serve` returns normally.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import anyio
import fastmcp
import uvicorn
from fastmcp import Context, FastMCP
from fastmcp.server.auth import AuthProvider
from fastmcp.tools import ToolResult
from mcp.types import ToolAnnotations
from pydantic import Field

from ubertool import __version__
from ubertool.playbooks.dump import NAME
from ubertool.runtime.about import tool_description
from ubertool.runtime.audit import AuditLog
from ubertool.runtime.cluster import Cluster, RaySessions
from ubertool.runtime.frontdoor import FrontDoor, principal, server_audit
from ubertool.runtime.journal import Journal
from ubertool.runtime.manager import Sessions
from ubertool.runtime.persist import SessionStore
from ubertool.runtime.policy import Policy
from ubertool.runtime.reply import refusal
from ubertool.runtime.runs import playbook_owner, playbooks_home
from ubertool.runtime.sessions import STOPPING, SessionError, SessionManager
from ubertool.runtime.telemetry import ERRORS

PROGRESS_AFTER_S = 1.0
GRACEFUL_S = 10.0  # how long uvicorn lets answered responses finish after a stop


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


async def _progress(ctx: Context, started: float, timeout_s: float) -> None:
    """Tell the client the cell is alive, now and every second, until cancelled."""
    while True:
        elapsed = time.monotonic() - started
        try:
            await ctx.report_progress(elapsed, total=timeout_s, message=f"running for {elapsed:.0f} s")
        except Exception:  # a client that went away must not stop the cell
            return
        await anyio.sleep(1.0)


def build_server(manager: Sessions, auth: AuthProvider | None = None) -> FastMCP[Any]:
    """The FastMCP app whose one tool runs cells in `manager`'s sessions (which it must run);
    over HTTP, `auth` verifies each request's bearer token."""
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
        limits = policy.limits
        timeout = limits.timeout_s if timeout_s is None else min(timeout_s, limits.max_timeout_s)
        with manager.stoppable():
            async with anyio.create_task_group() as tg:
                # The progress task starts only once the call has run a second: starting and
                # cancelling a task costs a tenth of a trivial call. (fastmcp serves on asyncio.)
                later = asyncio.get_running_loop().call_later(
                    PROGRESS_AFTER_S, tg.start_soon, _progress, ctx, time.monotonic(), timeout)
                try:
                    return await manager.call(session, _connection_key(ctx), principal(), code,
                                              timeout_s=timeout_s, traceparent=_traceparent(ctx))
                except SessionError as exc:
                    ERRORS.add(1, {"kind": "refused"})
                    return refusal(str(exc))
                finally:
                    later.cancel()
                    tg.cancel_scope.cancel()
        held = f"session {session}" if session else "its session"
        return refusal(f"[cancelled] {STOPPING}: this call was stopped ({held}); the session's "
                       "finished cells are in the journal (`ubertool sessions dump`).", status="cancelled")

    server: FastMCP[Any] = FastMCP(
        "ubertool", version=__version__, auth=auth,
        instructions="One tool, `python`: a persistent Python sandbox. Read its description.")
    server.tool(python, name="python", description=tool_description(policy),
                annotations=ToolAnnotations(title="Python sandbox", readOnlyHint=False,
                                            destructiveHint=False, idempotentHint=False,
                                            openWorldHint=False))
    _add_playbook_resources(server)
    return server


def _add_playbook_resources(server: FastMCP[Any]) -> None:
    """Saved playbooks as resources: `playbook://index` lists those the caller's principal
    saved, `playbook://NAME` is one of them. Playbooks nobody saved through a server session
    (dumped by the CLI, saved from a shell, copied in) stay on disk, unlisted."""

    def mine(name: str) -> bool:
        return playbook_owner(name) == principal()

    @server.resource("playbook://index", mime_type="application/json",
                     description="The playbooks you saved with ubertool.save_playbook(), by name.")
    def playbook_index() -> str:
        folder = playbooks_home()
        names = sorted(p.stem for p in folder.glob("*.py") if mine(p.stem)) if folder.is_dir() else []
        return json.dumps({"playbooks": names})

    @server.resource("playbook://{name}", mime_type="text/x-python",
                     description="One saved playbook's Python source.")
    def playbook_source(name: str) -> str:
        path = playbooks_home() / f"{name}.py"
        if not NAME.match(name) or not path.is_file() or not mine(name):
            raise ValueError(f"no playbook named {name!r}; playbook://index lists yours")
        return path.read_text(encoding="utf-8")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers (which re-raise the signal after serving, a
    traceback): `serve` stops the cells first, then tells uvicorn to exit."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _stop_on_signal(manager: Sessions, then: Callable[[], None]) -> None:
    """At SIGINT or SIGTERM, stop the calls in flight (each answered), then call `then`.
    Later signals are swallowed while the shutdown runs."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            break
        await manager.stop()
        then()
        await anyio.sleep_forever()


async def _serve_http(server: FastMCP[Any], manager: Sessions, door: FrontDoor, audit: AuditLog,
                      host: str, port: int) -> None:
    app = door.guard(server.http_app(transport="http", host_origin_protection=False), audit)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", ws="websockets-sansio",
                            timeout_graceful_shutdown=GRACEFUL_S,
                            log_level=fastmcp.settings.log_level.lower())
    web = _Uvicorn(config)

    def exit_web() -> None:
        web.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, manager, exit_web)
        await web.serve()
        tg.cancel_scope.cancel()


async def _serve_stdio(server: FastMCP[Any], manager: Sessions) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, manager, tg.cancel_scope.cancel)
        await server.run_async("stdio", show_banner=False)
        tg.cancel_scope.cancel()


def _sessions(policy: Policy, journal: Journal, cluster: Cluster | None,
              on_event: Callable[..., None] | None = None, store: SessionStore | None = None) -> Sessions:
    """In this process (saved to `store` when given), or (with `cluster`) in Ray actors; Ray is
    imported only then."""
    if cluster is None:
        return SessionManager(policy, journal=journal, on_event=on_event, store=store)
    return RaySessions(policy, cluster, on_event=on_event)


async def serve(policy: Policy, transport: str, *, host: str = "127.0.0.1", port: int = 8765,
                door: FrontDoor | None = None, cluster: Cluster | None = None) -> None:
    """Serve until the transport ends (stdin closed) or SIGINT/SIGTERM stops it cleanly.
    Over HTTP, `door` guards every request (default: loopback names only, no auth). With
    `cluster`, sessions live in Ray actors (see `cluster`) and outlive this server."""
    with Journal.default(policy.journal) as journal:
        store = SessionStore.default(journal) if policy.sessions.persist else None
        if transport != "http":
            async with _sessions(policy, journal, cluster, store=store).running() as manager:
                await _serve_stdio(build_server(manager), manager)
            return
        door = door or FrontDoor()
        with server_audit(transport="http", host=host, port=port, auth=door.kind,
                          allowed_hosts=list(door.allowed_hosts) or None,
                          allowed_origins=list(door.allowed_origins) or None,
                          cluster=cluster.address if cluster else None) as audit:
            async with _sessions(policy, journal, cluster, audit.event, store).running() as manager:
                await _serve_http(build_server(manager, door.auth), manager, door, audit, host, port)
