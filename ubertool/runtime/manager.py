"""The seam between the MCP server and where sessions live.

The server calls a `Sessions` object and nothing else: `sessions.SessionManager` keeps them in
this process (the default); `cluster.RaySessions` keeps each in a Ray actor on some node of a
cluster (`ubertool serve --cluster`). Both answer a call with the same `ToolResult`, built by
`answer` where the session runs (long output is saved in that session's workspace).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import Protocol

import anyio
from fastmcp.tools import ToolResult
from opentelemetry import trace

from ubertool.runtime.policy import Policy
from ubertool.runtime.reply import refusal, reply, saves
from ubertool.runtime.runs import Run
from ubertool.sandbox import SessionClosed


class Sessions(Protocol):
    """Where the server's sessions live. `running()` serves; `call` runs one cell."""

    policy: Policy

    def running(self) -> AbstractAsyncContextManager[Sessions]: ...

    async def stop(self) -> None: ...

    def stoppable(self) -> AbstractContextManager[anyio.CancelScope]: ...

    async def call(self, handle: str | None, key: str | None, principal: str, code: str, *,
                   timeout_s: float | None, traceparent: str | None) -> ToolResult:
        """Run `code` in the session named by `handle`, else the one bound to the connection
        `key`, else a new one owned by `principal`; the cell's tool result.

        Raises:
            SessionError: no session can be had (unknown to `principal`, none free, stopping).
        """
        ...


class CallScopes:
    """The calls in flight, each in a cancel scope that `stop` cancels (shared by every
    `Sessions`): after `stop`, new calls are cancelled at once."""

    def __init__(self) -> None:
        self._calls: set[anyio.CancelScope] = set()
        self._drained: anyio.Event | None = None  # set by the last call to end while stopping
        self.stopping = False

    async def stop(self) -> None:
        """Refuse new calls and stop the cells in flight; returns when every call has been
        answered (each cell stopped reports `cancelled`, "the server is stopping")."""
        self.stopping = True
        if self._calls:
            self._drained = anyio.Event()
            for scope in list(self._calls):
                scope.cancel()
            await self._drained.wait()

    @contextmanager
    def stoppable(self) -> Iterator[anyio.CancelScope]:
        """The scope of one call, cancelled by `stop` (at once when already stopping); the
        caller answers "the server is stopping" when its `cancelled_caught` is set."""
        with anyio.CancelScope() as scope:
            self._calls.add(scope)
            if self.stopping:
                scope.cancel()
            try:
                yield scope
            finally:
                self._calls.discard(scope)
                if not self._calls and self._drained is not None:
                    self._drained.set()


async def answer(handle: str, run: Run, code: str, *, timeout_s: float | None,
                 traceparent: str | None) -> ToolResult:
    """Run one cell of `run` (the session `handle`) and build its tool result; a session
    closed meanwhile is answered as a refusal. Cancellation stops the cell (see `Run.cell`).
    The current span (fastmcp's span of the call, in-process) gets the session's audit ids."""
    trace.get_current_span().set_attributes({"ubertool.session": handle, "ubertool.run": run.id,
                                             "ubertool.principal": run.record.principal or ""})
    try:
        result = await run.cell(code, timeout_s=run.timeout_for(timeout_s), traceparent=traceparent)
    except SessionClosed:
        return refusal(f"session {handle} was closed while this call waited. "
                       "Call again without `session` to start a new one.")
    if saves(result, run):  # saving long output writes into the workspace: off the event loop
        return await anyio.to_thread.run_sync(reply, handle, result, run)
    return reply(handle, result, run)  # a few microseconds: a thread hop would cost more
