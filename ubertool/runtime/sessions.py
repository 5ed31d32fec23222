"""The server's live sessions: one run per session handle, bounded, reaped when idle or old.

MCP's 2026-07-28 protocol has no session of its own, so a session is named by a handle the
server mints (`s-...`) and the client passes back. A connection that does have a stable
identity (a stdio server serves one client; a handshake-era HTTP client sends
`Mcp-Session-Id`) is mapped to its own session without a handle.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio

from ubertool.runtime.journal import Journal
from ubertool.runtime.policy import Policy
from ubertool.runtime.runs import Run, open_run


class SessionError(Exception):
    """A session cannot be had; the message says why and what to do."""


@dataclass
class _Live:
    handle: str
    run: Run
    stack: AsyncExitStack
    opened: float = field(default_factory=time.monotonic)


class SessionManager:
    """Opens, finds and closes sessions; an async context manager that closes all on exit."""

    def __init__(self, policy: Policy, *, journal: Journal | None = None, reap_every_s: float = 5.0) -> None:
        self.policy = policy
        self.journal = journal
        self._live: dict[str, _Live] = {}
        self._by_key: dict[str, str] = {}
        self._lock = anyio.Lock()
        self._reap_every_s = reap_every_s

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        """Serve: reap idle and old sessions in the background; close every session at the end."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._reaper)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    for handle in list(self._live):
                        await self.close(handle, reason="server stopping")

    async def get(self, handle: str | None, key: str | None) -> tuple[str, Run]:
        """The session named by `handle`, else the one bound to the connection `key`, else a
        new one (bound to `key` when given).

        Raises:
            SessionError: the handle is unknown (expired or never made), or the policy's
                `max_sessions` are open.
        """
        async with self._lock:
            if handle is not None:
                live = self._live.get(handle)
                if live is None:
                    raise SessionError(
                        f"no open session {handle!r}: it expired (idle over "
                        f"{self.policy.limits.session_idle_s:g} s or older than "
                        f"{self.policy.limits.session_lifetime_s:g} s), was closed, the server "
                        "restarted, or it never existed. Call again without `session` to start a new "
                        "one (its finished cells are in the journal: `ubertool sessions dump`).")
                return handle, live.run
            if key is not None and key in self._by_key:
                bound = self._by_key[key]
                return bound, self._live[bound].run
            return await self._open(key)

    async def _open(self, key: str | None) -> tuple[str, Run]:
        limit = self.policy.limits.max_sessions
        if len(self._live) >= limit:
            raise SessionError(
                f"{limit} sessions are open, the policy's limits.max_sessions; pass the `session` "
                "of one you have, or wait for idle ones to close "
                f"(after {self.policy.limits.session_idle_s:g} s).")
        handle = "s-" + secrets.token_urlsafe(12)
        stack = AsyncExitStack()
        run = await stack.enter_async_context(open_run(self.policy, journal=self.journal, kind="mcp"))
        run.name_session(handle)
        run.audit.event("session_open", session=handle)
        self._live[handle] = _Live(handle, run, stack)
        if key is not None:
            self._by_key[key] = handle
        return handle, run

    async def close(self, handle: str, *, reason: str) -> None:
        """Close one session and free its interpreter; unknown handles are ignored."""
        live = self._live.pop(handle, None)
        self._by_key = {k: h for k, h in self._by_key.items() if h != handle}
        if live is not None:
            live.run.audit.event("session_close", session=handle, reason=reason)
            await live.stack.aclose()

    def _expired(self, live: _Live, now: float) -> str:
        limits = self.policy.limits
        if now - live.opened > limits.session_lifetime_s:
            return f"older than session_lifetime_s ({limits.session_lifetime_s:g} s)"
        session = live.run.session
        if not session.busy and now - session.last_active > limits.session_idle_s:
            return f"idle over session_idle_s ({limits.session_idle_s:g} s)"
        return ""

    async def _reaper(self) -> None:
        while True:
            await anyio.sleep(min(self._reap_every_s, self.policy.limits.session_idle_s / 2))
            now = time.monotonic()
            for handle, live in list(self._live.items()):
                if reason := self._expired(live, now):
                    await self.close(handle, reason=reason)
