"""Sessions opened ahead of need (`[sessions] pool`): a new session's first cell then finds its
interpreter (and its template) open, and answers in milliseconds.

A pooled run is opened without a principal and without the journal: it is journaled, and its
principal set, when a session takes it; one never taken is closed with the server, unjournaled.
Each pooled session opened its own interpreter (from the template, reseeded, when one is named),
so no two share random streams or temporary names.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace

import anyio

from ubertool.runtime.journal import Journal
from ubertool.runtime.policy import Policy
from ubertool.runtime.runs import Run, open_run

log = logging.getLogger("ubertool.runtime")

# A refill waits this long after a take: opening an interpreter takes the CPU (and the GIL)
# the taken session's first cells need, and those are what the pool is for.
REFILL_AFTER_S = 0.5
RETRY_S = 5.0  # after a pooled run failed to open, or the budget had no room for one


class RunPool:
    """Up to `size` ready runs of `policy`. `fill` (run in the owner's task group) keeps it full
    while `room()` says the host has room for one more session; `take` hands one out."""

    def __init__(self, policy: Policy, size: int, room: Callable[[], Awaitable[bool]]) -> None:
        self.policy = policy
        self.size = size
        self._room = room
        self._ready: list[tuple[Run, AsyncExitStack]] = []
        self._wanted = anyio.Event()

    @property
    def runs(self) -> list[Run]:
        return [run for run, _ in self._ready]

    async def fill(self) -> None:
        """Open runs until `size` are ready, then wait for one to be taken; forever. Cancel it
        (with its task group), then `aclose`."""
        while True:
            if len(self._ready) >= self.size:
                self._wanted = anyio.Event()
                await self._wanted.wait()
                await anyio.sleep(REFILL_AFTER_S)
                continue
            if not await self._room():
                await anyio.sleep(RETRY_S)
                continue
            stack = AsyncExitStack()
            try:
                run = await stack.enter_async_context(open_run(self.policy, kind="mcp"))
            except Exception:
                await stack.aclose()
                log.exception("a pooled session could not be opened; trying again in %g s", RETRY_S)
                await anyio.sleep(RETRY_S)
                continue
            self._ready.append((run, stack))

    def take(self, principal: str, journal: Journal | None) -> tuple[Run, AsyncExitStack] | None:
        """A ready run, now `principal`'s and journaled in `journal`; None when none is ready."""
        if not self._ready:
            return None
        run, stack = self._ready.pop(0)
        self._wanted.set()
        run.record.principal = principal
        if journal is not None:
            journal.start_run(run.id, "mcp", self.policy.source, self.policy.sha256)
            stack.callback(journal.end_run, run.id)  # before the run's own end (last in, first out)
            run = replace(run, journal=journal)
        return run, stack

    async def drop(self) -> bool:
        """Close one ready run (the host needs its memory); whether there was one."""
        if not self._ready:
            return False
        _, stack = self._ready.pop()
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        return True

    async def aclose(self) -> None:
        """Close every ready run."""
        with anyio.CancelScope(shield=True):
            while self._ready:
                _, stack = self._ready.pop()
                await stack.aclose()
