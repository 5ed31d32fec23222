"""Sessions on a Ray cluster (`ubertool serve --cluster ADDRESS`): each one a Ray actor.

What lives where:
- A **session actor** (`SessionHost`), one per session, named by its handle in the namespace
  `ubertool`, detached (it outlives the front end that made it), holds the whole run on its
  node: sandbox, brokers, workspace, audit log; it writes its cells to the journal. It stores
  its owner and refuses every other principal exactly as an unknown handle. It closes itself
  when idle or old, under the same rules as in-process sessions.
- The **directory** (`Directory`), one detached actor on the head node, keeps a warm pool of
  started, unclaimed session actors per node, places new ones on the node with the most
  memory left (each actor reserves Ray's `memory` resource: the policy's guest memory plus an
  actor's own overhead), remembers each session's owner and current run, and restores a
  session whose node was lost.
- A **front end** (`RaySessions`) holds no session state: it finds a session's actor by name,
  passes it the authenticated principal, sends progress while the cell runs, and turns a
  client's cancellation into `ray.cancel` of the actor's call (the cell is interrupted and
  the state restored, as in-process). Only a connection's own binding (stdio, `Mcp-Session-Id`)
  is kept, as that connection is. It passes its span's trace context along, so the spans each
  actor exports (the policy's telemetry, per process) continue the MCP call's trace.

Node loss: a call that finds the actor dead asks the directory to restore the session on
another node. With `[sessions] persist`, each actor saves its session when it rests (image,
workspace and private root, sealed: `persist`) in the store beside the journal; a warm actor
on another node (a new one when there is none) takes the session up, resuming from the latest
save and replaying only the cells after it; without a save of the session's current run, it
replays every completed cell from the journal. That actor keeps its own name: the directory
maps the handle to it, and front ends learn the name from it. Replayed
cells are answered from their recorded exchanges (nothing outside happens twice), and the call
is answered with what happened. The journal and the store must be reachable from every node
(one machine's nodes share its state folder; across machines, PostgreSQL, and the same
`sessions.key` on every node).

Ray is imported only here, and only when a cluster is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import anyio
from fastmcp.tools import ToolResult
from mcp.types import TextContent
from opentelemetry import context as otel_context
from opentelemetry import propagate

from ubertool.runtime.home import state_folder
from ubertool.runtime.journal import Journal, journal_store
from ubertool.runtime.manager import CallScopes, answer
from ubertool.runtime.persist import NotYours, Record, SessionStore, load_session, save_session
from ubertool.runtime.policy import Policy
from ubertool.runtime.runs import Resumed, open_run
from ubertool.runtime.sessions import STOPPING, SessionError, _Live, expired, rest_due, save_due, saved
from ubertool.runtime.stores import JournalError
from ubertool.runtime.telemetry import telemetry
from ubertool.sandbox import SessionClosed, Status
from ubertool.sandbox.result import COMPLETED
from ubertool.tools.files import remove_tree

NAMESPACE = "ubertool"
DIRECTORY = "ubertool-directory"
# What a session actor's process holds beside its guest's memory (Python, Ray's core worker,
# wasmtime, the compiled interpreter), with room to spare: bench/cluster.py measured 187 MiB RSS
# (111 MiB PSS) for a session with a small state.
ACTOR_OVERHEAD_BYTES = 256 * 2**20
CANCEL_WAIT_S = 30.0  # how long a cancelled call waits for the actor to stop the cell and restore
LOST = "the loss of its node"  # what a session restored on another node was resumed after
REFILL_EVERY_S = 1.0
START_WAIT_S = 120.0  # a session actor not started by then (no node with room, after all) is ended


@dataclass(frozen=True)
class Cluster:
    """Where sessions run: `address` is `auto` (attach to the local Ray, or start one that
    lives as long as this process) or a Ray address (`HOST:PORT`); `warm` started, unclaimed
    sessions are kept per node."""

    address: str
    warm: int = 2
    namespace: str = NAMESPACE


def session_bytes(policy: Policy) -> int:
    """The Ray `memory` a session actor reserves on its node."""
    return policy.limits.memory_mib * 2**20 + ACTOR_OVERHEAD_BYTES


def _unknown(handle: str) -> SessionError:
    """The one answer for a handle that is not the caller's: expired, closed, lost beyond
    restore, another principal's, or never made (a guessed handle learns nothing)."""
    return SessionError(f"no open session {handle!r}: it expired, was closed, or never existed. Call "
                        "again without `session` to start a new one (its finished cells are in the "
                        "journal: `ubertool sessions dump`).")


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


class SessionHost:
    """One session in a Ray actor: its run on this node, its owner, its reaper.

    The directory calls `start` (then `claim` for a principal); front ends call `call` and
    `where`. Every call from a front end carries the principal it authenticated; any other
    than the owner is answered as an unknown session.
    """

    def __init__(self, policy: Policy, handle: str, namespace: str) -> None:
        self.policy = policy
        self.handle = handle
        self.namespace = namespace
        self._live: _Live | None = None
        self._stack = AsyncExitStack()
        self._reaper: asyncio.Task[None] | None = None
        self._store: SessionStore | None = None  # with `[sessions] persist`: where it is saved

    async def start(self, resume: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """Open the run (its interpreter started: a warm session); with `resume` (the run of a
        session lost with its node) bring that run's state back: from the session's latest
        saved image and folders when the policy saves sessions (`[sessions] persist`) and one
        of that run is in the store, else by replaying its cells from the journal. Returns the
        run id, the node and the restore report (None without `resume`).

        Raises:
            SandboxStartError: the sandbox could not be set up.
        """
        self._stack.enter_context(telemetry(self.policy))  # this process's spans and metrics, when on
        # Not `Journal.default`: that prunes, and a front end's start already does; an actor
        # (one per session, warm ones included) would prune at every start.
        journal = self._stack.enter_context(Journal(journal_store(self.policy.journal)))
        if self.policy.sessions.persist:
            self._store = SessionStore.default(journal)
        saved = await self._saved(resume, owner, journal) if resume and owner else None
        run = await self._stack.enter_async_context(
            open_run(self.policy, journal=journal, kind="mcp", principal=owner, resume=saved and saved[1]))
        run.name_session(self.handle)
        self._live = _Live(self.handle, owner or "", run, self._stack)
        if saved is not None:
            restored = self._resumed(saved[0])
        else:
            restored = await self._resume(resume, journal) if resume else None
        if owner:
            run.audit.event("session_open", session=self.handle, principal=owner, resumed_run=resume)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return {"run": run.id, "node": _node_id(), "restored": restored}

    async def _saved(self, run_id: str, owner: str, journal: Journal) -> tuple[Record, Resumed] | None:
        """What resumes run `run_id` of this session on this node from the store: None when the
        policy saves no session or the store holds none of that run (the session was lost
        before its first save, or its save is of an earlier run). The run's folders on this
        node are emptied for the saved ones."""
        if self._store is None:
            return None
        with contextlib.suppress(NotYours):  # the directory checked the owner; the store agrees or not
            loaded = await load_session(self._store, journal, self.handle, owner, moved=LOST)
            if loaded is not None and loaded[0].run_id == run_id:
                for name in ("root", "workspace"):  # on one machine's nodes, the lost actor's own
                    await anyio.to_thread.run_sync(remove_tree, state_folder("runs", run_id, name))
                return loaded
        return None

    def _resumed(self, record: Record) -> dict[str, Any]:
        """The restore report of a session resumed from the store (see `_resume`)."""
        assert self._live is not None
        live, run = self._live, self._live.run
        live.opened -= record.age_s  # its lifetime counts from when it was first opened
        live.calls = len(run.record.cells) + 1
        saved(live)
        resumed = run.session.resumption
        assert resumed is not None
        report = resumed.report
        facts = {"cells": report.cells, "seconds": round(report.seconds, 6), "ok": report.ok,
                 "failed_at": report.failed_at, "reason": report.reason, "from_run": run.id,
                 "image": resumed.from_image, "through": record.through, "image_note": resumed.note}
        run.audit.event("session_restored", session=self.handle, **facts)
        return facts

    async def _resume(self, run_id: str, journal: Journal) -> dict[str, Any]:
        """Replay the completed cells of run `run_id` (the lost node's) in this session, and
        copy them into this run's journal, so a later loss or a playbook finds them here."""
        assert self._live is not None
        run = self._live.run
        cells = await anyio.to_thread.run_sync(journal.cells, run_id)
        done = [cell for cell in cells if Status(cell.status) in COMPLETED]
        report = await run.session.adopt([(c.number, c.code, Status(c.status), c.exchanges) for c in done],
                                         next_cell=max((c.number for c in cells), default=0) + 1)
        self._live.calls = len(cells) + 1  # its earlier calls count: not an unused session
        for cell in done:
            run.record.cells.append(cell)
            await anyio.to_thread.run_sync(journal.add_cell, run.id, cell)
        facts = {"cells": report.cells, "seconds": round(report.seconds, 6), "ok": report.ok,
                 "failed_at": report.failed_at, "reason": report.reason, "from_run": run_id, "image": False}
        run.audit.event("session_restored", session=self.handle, **facts)
        return facts

    async def adopt(self, handle: str, run_id: str, owner: str) -> dict[str, Any]:
        """Take up `owner`'s session `handle` (its run `run_id`), lost with its node: this warm
        session's own run is closed and the lost one resumed in its place (see `start`). What
        `start` returns.

        Raises:
            SessionError: this session is not free (claimed meanwhile).
            SandboxStartError: the sandbox could not be set up.
        """
        live = self._live
        if live is None or live.principal:
            raise SessionError(f"session {self.handle} is not free")
        if self._reaper is not None:
            self._reaper.cancel()
        await self.close(f"its actor takes up session {handle}, lost with its node")
        self._stack = AsyncExitStack()
        self.handle = handle
        return await self.start(run_id, owner)

    async def claim(self, principal: str) -> str:
        """Give this warm session to `principal`; its run id.

        Raises:
            SessionError: it already has an owner.
        """
        live = self._live
        if live is None or live.principal:
            raise SessionError(f"session {self.handle} is not free")
        live.principal = live.run.record.principal = principal
        live.opened = live.last_used = time.monotonic()
        live.run.audit.event("session_open", session=self.handle, principal=principal)
        return live.run.id

    def _owned(self, principal: str) -> _Live:
        live = self._live
        if live is None or not live.principal:
            raise _unknown(self.handle)
        if live.principal != principal:
            live.run.audit.event("session_refused", principal=principal, reason="another principal's session")
            raise _unknown(self.handle)
        return live

    async def call(self, principal: str, code: str, timeout_s: float | None,
                   traceparent: str | None, carrier: dict[str, str] | None = None) -> ToolResult:
        """Run one cell for `principal` (see `manager.answer`); cancelling this call (`ray.cancel`)
        stops the cell. `carrier` holds the front end's trace context (W3C headers): the cell's
        spans continue the front end's span of the MCP call.

        Raises:
            SessionError: `principal` does not own this session.
        """
        live = self._owned(principal)
        live.active += 1
        live.calls += 1
        live.last_used = time.monotonic()
        token = otel_context.attach(propagate.extract(carrier or {}))
        try:
            return await answer(self.handle, live.run, code, timeout_s=timeout_s, traceparent=traceparent)
        finally:
            otel_context.detach(token)
            live.active -= 1
            live.last_used = time.monotonic()

    async def where(self) -> str:
        """The node this session runs on."""
        return _node_id()

    async def idle_s(self) -> float | None:
        """How long this session has been idle; None while it runs a call, or when it is closed.
        A save or compression of its image under way is not a call: it may still be evicted."""
        live = self._live
        if live is None or live.active:
            return None
        return time.monotonic() - max(live.last_used, live.run.session.last_active)

    async def _reap(self) -> None:
        """Close this session when it expires (as in-process: `sessions.expired`), then ask the
        directory to end the actor; save it, with its folders, when it rests (with `[sessions]
        persist`: what a restore on another node starts from), and compress its image."""
        policy = self.policy
        every = min(5.0, policy.limits.session_idle_s / 2, policy.server.unused_session_idle_s / 2,
                    policy.sessions.persist_idle_s / 2)
        while True:
            await asyncio.sleep(every)
            live, now = self._live, time.monotonic()
            if live is None or not live.principal:
                continue  # a warm session: its clock starts when it is claimed
            if reason := expired(policy, live, now):
                await self.close(reason)
                import ray
                directory = ray.get_actor(DIRECTORY, namespace=self.namespace)
                await directory.closed.remote(self.handle)
                return
            if self._store is not None and save_due(policy, live, now):
                await self._save(live)
            if rest_due(policy, live, now):
                await live.run.session.rest()
                live.rested_calls = live.calls

    async def _save(self, live: _Live) -> None:
        """Save the session and its folders to the store; a failure is audited (a restore then
        replays, as without the store)."""
        assert self._store is not None
        try:
            await save_session(self._store, self.handle, live.principal, live.run,
                               time.monotonic() - live.opened, carry=True)
        except (OSError, SessionClosed, JournalError) as exc:
            live.run.audit.event("session_save_failed", session=self.handle, error=str(exc))
            return
        saved(live)

    async def close(self, reason: str) -> None:
        """Close the run (credentials revoked, workspace removed, run ended in the journal) and
        forget its saved state."""
        live, self._live = self._live, None
        if live is not None:
            live.run.audit.event("session_close", session=self.handle, reason=reason)
            if self._store is not None:  # before the stack closes the journal it may sit in
                with contextlib.suppress(OSError, JournalError):
                    await anyio.to_thread.run_sync(self._store.delete, self.handle)
            await self._stack.aclose()


class Directory:
    """The cluster's sessions: owners, runs, the warm pool per node, placement and restore.
    One detached actor on the head node; its state is lost only with the head (and so the
    cluster)."""

    def __init__(self, policy: Policy, cluster: Cluster) -> None:
        self.policy = policy
        self.cluster = cluster
        self._bytes = session_bytes(policy)
        self._sessions: dict[str, tuple[str, str]] = {}  # handle -> (owner, current run id)
        self._given: dict[str, float] = {}  # handle -> when it was given out (monotonic)
        self._placed: dict[str, str] = {}  # actor name -> node id, for every actor made (warm or claimed)
        self._ready: dict[str, list[str]] = {}  # node id -> warm actors' names, oldest first
        # A session's actor is named by its handle, except when restored after a lost node: then
        # a warm actor (of another name) took it up.
        self._hosts: dict[str, str] = {}  # handle -> its actor's name, where they differ
        self._locks: dict[str, asyncio.Lock] = {}  # handle -> held while it is restored
        self._taking: dict[str, asyncio.Lock] = {}  # principal -> held while it takes a session
        self._total: dict[str, float] = {}  # alive node id -> its Ray memory (see `_refresh`)
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    async def hello(self, policy_sha256: str) -> str:
        """Start keeping the pool; the directory's policy hash, which a front end must share."""
        if self._filler is None:
            self._refresh()
            self._filler = asyncio.get_running_loop().create_task(self._fill())
        return self.policy.sha256

    async def take(self, principal: str) -> str:
        """A new session for `principal`: a warm one from the node with the most memory left,
        else one started now. Its handle.

        Raises:
            SessionError: no node has room for a session, or `principal` holds
                `server.max_sessions_per_principal` and each of them is running a call.
        """
        async with self._taking.setdefault(principal, asyncio.Lock()):  # one count of theirs at a time
            return await self._take(principal)

    async def _take(self, principal: str) -> str:
        await self._make_room(principal)
        for _ in range(3):  # a warm session may have been on a node just lost
            node = self._pick(warm=True)
            handle = self._ready[node].pop(0) if node else await self._make(self._pick(warm=False))
            try:
                run_id = await _actor(handle, self.cluster.namespace).claim.remote(principal)
            except _ray_errors() as exc:
                if isinstance(_cause(exc), SessionError):
                    raise _cause(exc) from None
                self._placed.pop(handle, None)
                self._refresh()
                continue
            finally:
                self._wake.set()  # refill, once this claim is answered
            self._sessions[handle] = (principal, run_id)
            self._given[handle] = time.monotonic()
            return handle
        raise SessionError("no session could be started: its nodes were lost; call again")

    async def _make_room(self, principal: str) -> None:
        """At `server.max_sessions_per_principal` (counted over the whole cluster), close
        `principal`'s longest idle session (one lost with its node first), as in-process.

        Raises:
            SessionError: every one of them is running a call.
        """
        cap = self.policy.server.max_sessions_per_principal
        own = [handle for handle, (owner, _) in self._sessions.items() if owner == principal]
        if len(own) < cap:
            return
        idle: dict[str, float] = {}
        for handle in own:
            try:
                host = _actor(await self.actor_name(handle), self.cluster.namespace)
                idle_s = await asyncio.wait_for(host.idle_s.remote(), 5)
            except (ValueError, *_ray_errors(), TimeoutError):  # lost with its node, or not answering
                idle_s = float("inf")
            if idle_s is not None:
                idle[handle] = idle_s
        why = f"{len(own)} sessions of yours are open, the policy's server.max_sessions_per_principal"
        if not idle:
            raise SessionError(f"{why}, and all of yours are running a cell; pass the `session` of one you "
                               "have, or call again when a cell has finished.")
        victim = max(idle, key=idle.__getitem__)
        with contextlib.suppress(ValueError, *_ray_errors(), TimeoutError):
            host = _actor(await self.actor_name(victim), self.cluster.namespace)
            await asyncio.wait_for(host.close.remote(f"evicted: the least recently used idle session of "
                                                     f"its principal ({why})"), 30)
        await self.closed(victim)

    async def locate(self, handle: str, principal: str) -> dict[str, Any]:
        """Where `principal`'s session `handle` runs: its actor's name (a session restored after
        a lost node runs in an actor of another name), and, when its actor was gone and this
        call brought it back, what happened (`report`; None when it was alive).

        A lost session is restored on another node, in a warm actor when one is there (its
        process is started: the restore then costs what the resume does), else in a new one.

        Raises:
            SessionError: `handle` is not `principal`'s session, or no node has room.
        """
        owner, run_id = self._sessions.get(handle, ("", ""))
        if owner != principal:
            raise _unknown(handle)
        async with self._locks.setdefault(handle, asyncio.Lock()):
            name = await self.actor_name(handle)
            with contextlib.suppress(ValueError, *_ray_errors(), TimeoutError):
                node = await asyncio.wait_for(_actor(name, self.cluster.namespace).where.remote(), 5)
                return {"actor": name, "node": node, "report": None}
            lost = self._placed.pop(name, None)
            self._refresh()
            name, info = await self._resume_elsewhere(handle, run_id, principal, lost)
            self._hosts[handle] = name
            self._placed[name] = info["node"]
            self._sessions[handle] = (principal, info["run"])
            self._given[handle] = time.monotonic()  # its lifetime starts again, as the actor's does
            return {"actor": name, "node": info["node"], "lost_node": lost, "report": info["restored"]}

    async def _resume_elsewhere(self, handle: str, run_id: str, principal: str,
                                lost: str | None) -> tuple[str, dict[str, Any]]:
        """Resume session `handle` (run `run_id`) in a warm actor off the node `lost`, else in a
        new one; the actor's name and what its `start` said.

        Raises:
            SessionError: no node has room, or the resume failed.
        """
        import ray
        from ray.exceptions import RayTaskError
        for _ in range(3):  # a warm actor may be on a node lost too (Ray has not said so yet)
            node = self._pick(warm=True, avoid=lost)
            name = self._ready[node].pop(0) if node else await self._make(self._pick(warm=False, avoid=lost))
            self._wake.set()  # refill
            host = _actor(name, self.cluster.namespace)
            try:
                return name, await host.adopt.remote(handle, run_id, principal)
            except _ray_errors() as exc:
                ray.kill(host)
                self._placed.pop(name, None)
                if isinstance(exc, RayTaskError) and not isinstance(_cause(exc), SessionError):
                    raise SessionError(f"session {handle} could not be restored: {_cause(exc)}") from None
                self._refresh()  # its actor died (its node too?), or was not free: another one
        raise SessionError(f"session {handle} could not be restored: its new nodes were lost too; call again")

    async def knows(self, handle: str) -> bool:
        """Whether `handle` is a session this directory gave out and has not seen closed."""
        return handle in self._sessions

    async def closed(self, handle: str) -> None:
        """A session closed itself (expired): forget it and end its actor."""
        import ray
        name = await self.actor_name(handle)
        self._forget(handle)
        with contextlib.suppress(ValueError):
            ray.kill(_actor(name, self.cluster.namespace))

    def _forget(self, handle: str) -> None:
        self._placed.pop(self._hosts.pop(handle, handle), None)
        for table in (self._sessions, self._given, self._locks):
            table.pop(handle, None)

    def _forget_old(self) -> None:
        """Forget sessions given out longer ago than their lifetime: one lost with its node and
        never called again leaves no entry behind (a live one has closed itself by then)."""
        cutoff = time.monotonic() - self.policy.limits.session_lifetime_s
        for handle in [h for h, given in self._given.items() if given < cutoff]:
            self._forget(handle)

    async def actor_name(self, handle: str) -> str:
        """The name of session `handle`'s actor (the handle, unless a warm actor took it up)."""
        return self._hosts.get(handle, handle)

    async def pool(self) -> dict[str, int]:
        """Warm sessions per node id (for tests and benchmarks)."""
        return {node: len(handles) for node, handles in self._ready.items()}

    def _refresh(self) -> None:
        """Learn the alive nodes and their memory from Ray (a call to its control store, kept
        off the allocation path: the pool's loop and a restore call this)."""
        import ray
        self._total = {n["NodeID"]: n["Resources"].get("memory", 0.0) for n in ray.nodes() if n["Alive"]}

    def _nodes(self) -> dict[str, float]:
        """Alive nodes' memory left for sessions (as of the last `_refresh`): their Ray memory
        less what the sessions this directory placed there reserve. Forgets what was placed on
        nodes no longer alive."""
        total = dict(self._total)
        for handle, node in list(self._placed.items()):
            if node not in total:
                del self._placed[handle]
        for node in list(self._ready):
            if node not in total:
                del self._ready[node]
        for node in self._placed.values():
            total[node] -= self._bytes
        return total

    def _pick(self, *, warm: bool, avoid: str | None = None) -> str | None:
        """The node with the most memory left, other than `avoid`: among those with a warm
        session (`warm`), else among those with room for one more (None when `warm` finds no
        warm session).

        Raises:
            SessionError: not `warm`, and no node has room.
        """
        free = self._nodes()
        if warm:
            nodes = [n for n in free if self._ready.get(n) and n != avoid]
            return max(nodes, key=free.__getitem__) if nodes else None
        nodes = [n for n, left in free.items() if left >= self._bytes and n != avoid]
        if not nodes:
            raise SessionError(f"no node of the cluster has {self._bytes / 2**20:.0f} MiB of memory left "
                               "for a session (the policy's limits.memory_mib and an actor's overhead); "
                               "call again when sessions have closed, or add a node")
        return max(nodes, key=free.__getitem__)

    def _host(self, handle: str, node: str | None) -> Any:
        """A new session actor named `handle`, pinned to `node`.

        Raises:
            ValueError: the name is taken (a lost actor Ray has not yet marked dead).
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        actor = _classes()[0].options(
            name=handle, namespace=self.cluster.namespace, lifetime="detached", max_restarts=0,
            num_cpus=0, memory=self._bytes,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(self.policy, handle, self.cluster.namespace)
        assert node is not None
        self._placed[handle] = node
        return actor

    async def _make(self, node: str | None) -> str:
        """Start a warm session on `node`; its handle.

        Raises:
            SessionError: it could not be started.
        """
        import ray
        handle = "s-" + secrets.token_urlsafe(12)
        host = self._host(handle, node)
        try:
            await asyncio.wait_for(host.start.remote(), START_WAIT_S)
        except (*_ray_errors(), TimeoutError) as exc:  # e.g. Ray found no room after all: it waits
            self._placed.pop(handle, None)
            ray.kill(host)
            why = str(_cause(exc)) or f"it did not start within {START_WAIT_S:g} s"
            raise SessionError(f"a session could not be started: {why}") from None
        return handle

    async def _fill(self) -> None:
        """Keep `cluster.warm` warm sessions on every alive node that has room, one at a time
        (starting one is the costly part: a process and an interpreter)."""
        while True:
            self._refresh()
            self._forget_old()
            free = self._nodes()
            short = sorted((n for n in free if len(self._ready.setdefault(n, [])) < self.cluster.warm
                            and free[n] >= self._bytes), key=free.__getitem__, reverse=True)
            for node in short:
                try:
                    handle = await self._make(node)
                except SessionError:
                    continue
                if node in self._ready:
                    self._ready[node].append(handle)
            if not short:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), REFILL_EVERY_S)


def _ray_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError, RayTaskError
    return (RayActorError, RayTaskError)


def _cause(exc: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's wrapper."""
    return getattr(exc, "cause", None) or exc


def _actor(handle: str, namespace: str) -> Any:
    """The live actor named `handle`.

    Raises:
        ValueError: no actor has that name (never made, closed, or lost and released).
    """
    import ray
    return ray.get_actor(handle, namespace=namespace)


@cache
def _classes() -> tuple[Any, Any]:
    """The Ray actor classes (made at first use: Ray is imported only with a cluster)."""
    import ray
    return ray.remote(SessionHost), ray.remote(Directory)


class RaySessions(CallScopes):
    """The front end's `manager.Sessions` on a Ray cluster (see the module's docstring)."""

    def __init__(self, policy: Policy, cluster: Cluster, *,
                 on_event: Callable[..., None] | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.cluster = cluster
        self._on_event = on_event or (lambda kind, **fields: None)
        self._directory: Any = None
        self._keyed: dict[tuple[str, str], str] = {}  # a connection's own session (stdio, Mcp-Session-Id)
        self._names: dict[str, str] = {}  # handle -> its actor's name, where they differ (restored)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RaySessions]:
        """Attach to the cluster (and start the directory when it is the first front end);
        on exit stop the calls in flight and detach. The sessions stay.

        Raises:
            SessionError: the cluster runs sessions under another policy.
            ConnectionError: no Ray cluster at the address.
        """
        await anyio.to_thread.run_sync(self._connect)
        try:
            theirs = await self._directory.hello.remote(self.policy.sha256)
            if theirs != self.policy.sha256:
                raise SessionError(f"the cluster's sessions run under another policy (sha256 {theirs[:12]}, "
                                   f"this front end's is {self.policy.sha256[:12]}); serve with the same "
                                   "policy, or restart the cluster")
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop()
                import ray
                await anyio.to_thread.run_sync(ray.shutdown)

    def _connect(self) -> None:
        # ray.init installs its own fault handlers, replacing the SIGSEGV handler wasmtime needs:
        # harmless here, as a front end never opens a sandbox (a process that does must open its
        # first one after ray.init; Ray's workers do, as they start before the actor's code).
        import ray
        options: dict[str, Any] = {"namespace": self.cluster.namespace, "log_to_driver": False,
                                   "logging_level": "WARNING"}
        if self.cluster.address == "auto":
            try:
                ray.init(address="auto", **options)
            except ConnectionError:  # none running: one of our own, ending with this process
                ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=self.cluster.address, **options)
        self._directory = _classes()[1].options(
            name=DIRECTORY, namespace=self.cluster.namespace, lifetime="detached", get_if_exists=True,
            num_cpus=0, resources={"node:__internal_head__": 0.001},
        ).remote(self.policy, self.cluster)

    async def call(self, handle: str | None, key: str | None, principal: str, code: str, *,
                   timeout_s: float | None, traceparent: str | None) -> ToolResult:
        """See `manager.Sessions.call`; a session whose node was lost is restored and the call
        answered with that (its cell not run: the caller runs it again on the restored state)."""
        if self.stopping:
            raise SessionError(f"{STOPPING}; call again when it is back.")
        if handle is None and key is not None:
            handle = self._keyed.get((principal, key))
            if handle is not None and not await self._exists(handle):
                del self._keyed[(principal, key)]  # the connection's session expired: a new one
                handle = None
        if handle is None:
            handle = await self._remote(self._directory.take.remote(principal))
            if key is not None:
                self._keyed[(principal, key)] = handle
        try:
            actor = _actor(self._names.get(handle, handle), self.cluster.namespace)
        except ValueError:  # unknown unless it is a session of yours: restored before, or lost now
            info = await self._locate(handle, principal)
            if info["report"] is not None:
                return self._restored(handle, principal, info)
            try:
                actor = _actor(info["actor"], self.cluster.namespace)
            except ValueError:  # lost again meanwhile
                return await self._restore(handle, principal)
        from ray.exceptions import RayActorError
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the span of this MCP call, for the actor's spans to continue
        try:
            return await self._remote(actor.call.remote(principal, code, timeout_s, traceparent, carrier))
        except RayActorError:
            return await self._restore(handle, principal)

    async def _exists(self, handle: str) -> bool:
        """Whether the directory still knows session `handle` (open, or lost and restorable)."""
        return bool(await self._remote(self._directory.knows.remote(handle)))

    async def _remote(self, ref: Any) -> Any:
        """The value of an actor call; a `SessionError` it raised comes out as one. Cancelling
        cancels the call in the actor (a cell is interrupted and its state restored) and waits
        for that (at most `CANCEL_WAIT_S`) before going on."""
        import ray
        from ray.exceptions import RayTaskError
        try:
            return await ref
        except RayTaskError as exc:
            if isinstance(exc.cause, SessionError):
                raise SessionError(str(exc.cause)) from None
            raise
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                ray.cancel(ref)
                with anyio.move_on_after(CANCEL_WAIT_S), contextlib.suppress(Exception):
                    await ref
            raise

    async def _locate(self, handle: str, principal: str) -> dict[str, Any]:
        """Ask the directory where session `handle` runs (restoring it when it was lost); see
        `Directory.locate`. The actor's name is kept for the next calls."""
        try:
            info = await self._remote(self._directory.locate.remote(handle, principal))
        except SessionError:
            self._names.pop(handle, None)
            raise
        if info["actor"] != handle:
            self._names[handle] = info["actor"]
        return info

    async def _restore(self, handle: str, principal: str) -> ToolResult:
        """After the actor of `handle` died under a call: have it restored on another node (or
        find it restored already); the call's answer saying so (its code is not run again: it
        may have done part of its work before the node died)."""
        return self._restored(handle, principal, await self._locate(handle, principal))

    def _restored(self, handle: str, principal: str, info: dict[str, Any]) -> ToolResult:
        """The answer to a call that found its session's node lost (see `_restore`)."""
        self._on_event("session_restored", session=handle, principal=principal, node=info["node"],
                       lost_node=info.get("lost_node"), restored=info.get("report"))
        report = info.get("report")
        if report is None:
            how = "another front end restored it already"
        elif report["ok"] and report.get("image"):
            later = f" and its {report['cells']} later cells replayed" if report["cells"] else ""
            how = (f"it was resumed from its image saved after cell {report['through']}{later} in "
                   f"{report['seconds']:.2f} s")
        elif report["ok"]:
            note = report.get("image_note")
            unused = f" (its saved image was not used: {note})" if note else ""
            how = (f"its {report['cells']} finished cells were replayed from the journal in "
                   f"{report['seconds']:.2f} s{unused}")
        else:
            how = (f"replaying its cells from the journal stopped at cell {report['failed_at']} "
                   f"({report['reason']}): the state is as of the cells before it")
        message = (f"[restored] session {handle} was on a node that was lost; it now runs on node "
                   f"{info['node'][:12]}: {how}. This call's code did not run (or did not finish): "
                   "call again to run it.")
        return ToolResult(content=[TextContent(type="text", text=message)],
                          structured_content={"session": handle, "status": "cancelled", "message": message,
                                              "restored": report, "node": info["node"]},
                          is_error=True)
