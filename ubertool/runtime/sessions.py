"""The server's live sessions: one run per session handle, owned by a principal, bounded,
reaped when idle or old, stopped cleanly with the server.

MCP's 2026-07-28 protocol has no session of its own, so a session is named by a handle the
server mints (`s-...`) and the client passes back. A handle only works for the principal that
opened the session (the token's subject; every client is `anonymous` when authentication is
off): to anyone else it is an unknown session. A connection that does have a stable identity
(a stdio server serves one client; a handshake-era HTTP client sends `Mcp-Session-Id`) is
mapped to its own session without a handle.

No lock-out: when a principal is at `[server] max_sessions_per_principal`, or the server at
`limits.max_sessions`, the least recently used idle session (the principal's own, or any) is
closed, audited, before a new one is refused. A session opened and never called again is
closed after `[server] unused_session_idle_s` (unless its connection names it: stdio,
`Mcp-Session-Id`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
from fastmcp.tools import ToolResult

from ubertool.runtime.journal import Journal
from ubertool.runtime.manager import CallScopes, answer
from ubertool.runtime.persist import NotYours, SessionStore, load_session, prune_saved, save_session
from ubertool.runtime.policy import Policy
from ubertool.runtime.pool import RunPool
from ubertool.runtime.runs import Run, open_run
from ubertool.runtime.telemetry import SESSIONS
from ubertool.sandbox import SessionClosed

log = logging.getLogger("ubertool.runtime")

ANONYMOUS = "anonymous"  # the one principal when authentication is off
STOPPING = "the server is stopping"


# A new session's guest memory and image, about (a fresh interpreter holds ~40 MiB, its first
# image as much): what the host budget keeps room for before opening one.
NEW_SESSION_BYTES = 96 * 2**20
BUSY_REST_S = 1.0  # the rest that saves a session whose unsaved cells ran persist_idle_s (`save_due`)


class SessionError(Exception):
    """A session cannot be had; the message says why and what to do."""


@dataclass
class _Live:
    handle: str
    principal: str
    run: Run
    stack: AsyncExitStack
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    keyed: bool = False  # bound to a connection (stdio, Mcp-Session-Id), which names it in every call
    calls: int = 0  # calls that asked for this session, the one that opened it included
    active: int = 0  # calls holding it now (from `use` until their reply)
    saved_calls: int = -1  # `calls` when it was last saved (`[sessions] persist`)
    saved_cells: int = 0  # how many of its run's cells it was last saved with
    rested_calls: int = -1  # `calls` when its image was last compressed (see `_reaper`)

    def idle(self) -> bool:
        return self.active == 0 and not self.run.session.busy


class SessionManager(CallScopes):
    """Opens, finds and closes sessions in this process (the `manager.Sessions` the server uses
    without `--cluster`); `running()` serves and closes all on exit.

    `on_event(kind, **fields)` receives server-level events (a refused foreign handle); each
    run's own events go to its audit log.
    """

    def __init__(self, policy: Policy, *, journal: Journal | None = None, reap_every_s: float = 5.0,
                 on_event: Callable[..., None] | None = None, store: SessionStore | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.journal = journal
        # Saved sessions (`[sessions] persist`): they need the journal, to replay what an image lacks.
        self.store = store if journal is not None else None
        self.pool = RunPool(policy, policy.sessions.pool, self._pool_room)
        self._live: dict[str, _Live] = {}
        self._by_key: dict[tuple[str, str], str] = {}
        self._lock = anyio.Lock(fast_acquire=True)  # no loop round trip when free
        self._reap_every_s = reap_every_s
        self._on_event = on_event or (lambda kind, **fields: None)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        """Serve: reap idle and old sessions in the background; on exit stop the calls in
        flight (see `stop`) and close every session, each run ended in the journal."""
        if self.store is not None and self.journal is not None:
            await anyio.to_thread.run_sync(prune_saved, self.store, self.journal,
                                           self.policy.journal.keep_days * 86_400, self.policy.workspace.keep)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._reaper)
            if self.pool.size:
                tg.start_soon(self.pool.fill)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.stop()
                    await self.pool.aclose()
                    for handle in list(self._live):
                        saved = await self._save(handle)
                        await self.close(handle, reason="server stopping", suspend=saved)

    async def call(self, handle: str | None, key: str | None, principal: str, code: str, *,
                   timeout_s: float | None, traceparent: str | None) -> ToolResult:
        """See `manager.Sessions.call`."""
        async with self.use(handle, key, principal) as (name, run):
            return await answer(name, run, code, timeout_s=timeout_s, traceparent=traceparent)

    @asynccontextmanager
    async def use(self, handle: str | None, key: str | None,
                  principal: str = ANONYMOUS) -> AsyncIterator[tuple[str, Run]]:
        """The session named by `handle`, else the one bound to the connection `key`, else a
        new one (bound to `key` when given), held for one call: it is not evicted meanwhile.

        Raises:
            SessionError: the handle is unknown to `principal` (expired, closed, never made, or
                another principal's), no session is free to evict for a new one, or the
                server is stopping.
        """
        live = await self._get(handle, key, principal)
        live.active += 1
        live.calls += 1
        live.last_used = time.monotonic()
        try:
            yield live.handle, live.run
        finally:
            live.active -= 1
            live.last_used = time.monotonic()

    async def _get(self, handle: str | None, key: str | None, principal: str) -> _Live:
        if self.stopping:
            raise SessionError(f"{STOPPING}; call again when it is back.")
        async with self._lock:
            if handle is not None:
                live = self._live.get(handle)
                if live is not None and live.principal != principal:
                    # Answered exactly as an unknown handle: a guessed or stolen one tells nothing.
                    self._on_event("session_refused", principal=principal, owner_run=live.run.id,
                                   reason="another principal's session")
                    live = None
                elif live is None:
                    live = await self._resume(handle, principal)
                if live is None:
                    raise SessionError(
                        f"no open session {handle!r}: it expired (idle over "
                        f"{self.policy.limits.session_idle_s:g} s or older than "
                        f"{self.policy.limits.session_lifetime_s:g} s), was closed, the server "
                        "restarted before it could be saved, or it never existed. Call again "
                        "without `session` to start a new one (its finished cells are in the "
                        "journal: `ubertool sessions dump`).")
                return live
            bound = self._by_key.get((principal, key)) if key is not None else None
            if bound is not None and bound in self._live:
                return self._live[bound]
            while await self._make_room(principal):
                pass  # a budget may need more than one idle session closed
            return await self._open(key, principal)

    async def _make_room(self, principal: str) -> bool:
        """Close an idle session if the principal or the server is full (in sessions, or in the
        host memory they hold): the least recently used of the principal's own, or server-wide of
        the principal holding the most sessions; whether it closed one.

        Raises:
            SessionError: full, and every candidate session is running a call.
        """
        cap = self.policy.server.max_sessions_per_principal
        own = [live for live in self._live.values() if live.principal == principal]
        if len(own) >= cap:
            scope, candidates = "yours", own
            why = f"{len(own)} sessions of yours are open, the policy's server.max_sessions_per_principal"
        elif len(self._live) >= self.policy.limits.max_sessions:
            scope, candidates = "the server's", list(self._live.values())
            why = f"{len(self._live)} sessions are open, the policy's limits.max_sessions"
        elif (held := self.host_bytes()) + NEW_SESSION_BYTES > self.policy.limits.host_memory_mib * 2**20:
            if await self.pool.drop():  # a session opened ahead of need goes before anyone's
                return True
            scope, candidates = "the server's", list(self._live.values())
            why = (f"the open sessions hold {held / 2**20:.0f} MiB, and a new one would pass the policy's "
                   f"limits.host_memory_mib ({self.policy.limits.host_memory_mib})")
        else:
            return False
        idle = [live for live in candidates if live.idle()]
        if not idle:
            raise SessionError(f"{why}, and all of {scope} are running a cell; pass the `session` of "
                               "one you have, or call again when a cell has finished.")
        # Server-wide, the principal holding the most sessions gives one up first: one busy
        # agent cannot push everyone else's sessions out. Among theirs, the least recently used.
        held = Counter(live.principal for live in self._live.values())
        victim = min(idle, key=lambda live: (-held[live.principal], live.last_used))
        await self.close(victim.handle, reason=f"evicted: the least recently used idle session of the "
                                               f"principal holding the most ({why})")
        return True

    def host_bytes(self) -> int:
        """What the open sessions hold on the host (guest memory and images), as of their last cells."""
        runs = [live.run for live in self._live.values()] + self.pool.runs
        return sum(run.session.host_bytes for run in runs)

    async def _open(self, key: str | None, principal: str) -> _Live:
        handle = "s-" + secrets.token_urlsafe(12)
        taken = self.pool.take(principal, self.journal)
        if taken is not None:
            run, stack = taken
        else:
            stack = AsyncExitStack()
            run = await stack.enter_async_context(open_run(self.policy, journal=self.journal, kind="mcp",
                                                           principal=principal))
        run.name_session(handle)
        run.audit.event("session_open", session=handle, principal=principal)
        live = self._live[handle] = _Live(handle, principal, run, stack, keyed=key is not None)
        SESSIONS.add(1)
        if key is not None:
            self._by_key[(principal, key)] = handle
        return live

    async def close(self, handle: str, *, reason: str, suspend: bool = False) -> None:
        """Close one session and free its interpreter; unknown handles are ignored. With
        `suspend` (it was just saved), its folders and saved state are kept to resume it after a
        restart; otherwise what was saved of it is deleted."""
        live = self._live.pop(handle, None)
        self._by_key = {k: h for k, h in self._by_key.items() if h != handle}
        if live is not None:
            live.run.audit.event("session_close", session=handle, reason=reason, suspended=suspend or None)
            live.run.record.suspended = suspend
            SESSIONS.add(-1)
            await live.stack.aclose()
        if self.store is not None and not suspend:
            await anyio.to_thread.run_sync(self.store.delete, handle)

    async def _save(self, handle: str) -> bool:
        """Save a live session to the store (`[sessions] persist`); whether it was saved.
        A failure is logged and audited: the session then ends as it would without the store."""
        live = self._live.get(handle)
        if live is None or self.store is None:
            return False
        try:
            await save_session(self.store, handle, live.principal, live.run, time.monotonic() - live.opened)
        except (OSError, SessionClosed) as exc:
            log.warning("session %s could not be saved: %s", handle, exc)
            live.run.audit.event("session_save_failed", session=handle, error=str(exc))
            return False
        saved(live)
        return True

    async def _resume(self, handle: str, principal: str) -> _Live | None:
        """The saved session `handle` of `principal`, opened again; None when there is none."""
        if self.store is None or self.journal is None:
            return None
        try:
            loaded = await load_session(self.store, self.journal, handle, principal)
        except NotYours as exc:
            self._on_event("session_refused", principal=principal, owner_run=str(exc),
                           reason="another principal's saved session")
            return None
        if loaded is None:
            return None
        record, resumed = loaded
        while await self._make_room(principal):
            pass
        stack = AsyncExitStack()
        run = await stack.enter_async_context(open_run(self.policy, journal=self.journal, kind="mcp",
                                                       principal=principal, resume=resumed))
        run.record.session = handle
        run.audit.event("session_resumed", session=handle, principal=principal, through=record.through)
        live = self._live[handle] = _Live(handle, principal, run, stack)
        SESSIONS.add(1)
        live.opened -= record.age_s  # its lifetime counts from when it was first opened
        saved(live)
        return live

    async def _pool_room(self) -> bool:
        """Whether the host has room for one more pooled session and, beside it, a new one
        opened on demand: the pool only uses what no session would need."""
        held = self.host_bytes() + 2 * NEW_SESSION_BYTES
        return (len(self._live) + len(self.pool.runs) < self.policy.limits.max_sessions
                and held <= self.policy.limits.host_memory_mib * 2**20)

    async def _reaper(self) -> None:
        every = min(self._reap_every_s, self.policy.limits.session_idle_s / 2,
                    self.policy.server.unused_session_idle_s / 2, self.policy.sessions.persist_idle_s / 2)
        while True:
            await anyio.sleep(every)
            now = time.monotonic()
            for handle, live in list(self._live.items()):
                if reason := expired(self.policy, live, now):
                    await self.close(handle, reason=reason)
                    continue
                if self.store is not None and save_due(self.policy, live, now):
                    await self._save(handle)
                if rest_due(self.policy, live, now):  # an idle session's image, compressed (~7x)
                    await live.run.session.rest()
                    live.rested_calls = live.calls


def rested(policy: Policy, live: _Live, now: float) -> bool:
    """Whether `live` has been idle `sessions.persist_idle_s`."""
    return now - max(live.last_used, live.run.session.last_active) > policy.sessions.persist_idle_s


def rest_due(policy: Policy, live: _Live, now: float) -> bool:
    """Whether an idle session's image is to be compressed: once per rest of persist_idle_s."""
    return live.idle() and live.rested_calls != live.calls and rested(policy, live, now)


def save_due(policy: Policy, live: _Live, now: float) -> bool:
    """Whether an idle session has cells it was not saved with, and has rested long enough:
    `sessions.persist_idle_s`, or `BUSY_REST_S` once those cells took `persist_idle_s` to run
    (a session called all the time is saved too: what a restore replays stays bounded)."""
    if not live.idle() or live.saved_calls == live.calls:
        return False
    if rested(policy, live, now):
        return True
    unsaved_s = sum(cell.duration_s for cell in live.run.record.cells[live.saved_cells:])
    return (unsaved_s >= policy.sessions.persist_idle_s
            and now - max(live.last_used, live.run.session.last_active) >= BUSY_REST_S)


def saved(live: _Live) -> None:
    """Note that `live` was saved as it is now."""
    live.saved_calls, live.saved_cells = live.calls, len(live.run.record.cells)


def expired(policy: Policy, live: _Live, now: float) -> str:
    """Why `live` is to be closed now (older than its lifetime, idle too long, never called
    again), or ''."""
    limits, server = policy.limits, policy.server
    if now - live.opened > limits.session_lifetime_s:
        return f"older than session_lifetime_s ({limits.session_lifetime_s:g} s)"
    if not live.idle():
        return ""
    unused = server.unused_session_idle_s
    if not live.keyed and live.calls <= 1 and now - live.last_used > unused:
        return f"never called again within server.unused_session_idle_s ({unused:g} s)"
    if now - max(live.last_used, live.run.session.last_active) > limits.session_idle_s:
        return f"idle over session_idle_s ({limits.session_idle_s:g} s)"
    return ""
