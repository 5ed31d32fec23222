"""A run: the unit of work (one MCP session, one `ubertool run` or `shell`, one replay).

A run owns its id, the effective policy, its workspace folder, its audit log and its sandbox
session. Later it also owns its journal entries and credentials.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ubertool.runtime.about import about_text
from ubertool.runtime.audit import AuditLog, code_hash
from ubertool.runtime.home import state_home
from ubertool.runtime.policy import Policy
from ubertool.sandbox import CellResult, Limits, ReadOnlyGrant, SandboxConfig, SandboxSession


@dataclass(frozen=True)
class Run:
    """One run and its live sandbox session."""

    id: str
    policy: Policy
    workspace: Path
    audit: AuditLog
    session: SandboxSession

    def timeout_for(self, asked: float | None) -> float:
        """The time limit of a cell: what the caller asked, capped by the policy."""
        limits = self.policy.limits
        return limits.timeout_s if asked is None else min(asked, limits.max_timeout_s)

    async def cell(self, code: str, *, timeout_s: float | None = None, echo: bool = True,
                   traceparent: str | None = None) -> CellResult:
        """Run one cell in this run's session, with its audit events (see `SandboxSession.run`)."""
        timeout = self.timeout_for(timeout_s)
        self.audit.event("cell_start", code=code_hash(code), timeout_s=timeout, traceparent=traceparent)
        try:
            result = await self.session.run(code, timeout_s=timeout, echo=echo)
        except BaseException as exc:
            self.audit.event("cell_abandoned", reason=type(exc).__name__, traceparent=traceparent)
            raise
        restored = result.restored
        self.audit.event(
            "cell_end", cell=result.cell, status=str(result.status), duration_s=round(result.duration_s, 6),
            error=result.error.type if result.error else None, traceparent=traceparent,
            restored_cells=restored.cells if restored else None,
            restore_ok=restored.ok if restored else None)
        return result


def new_run_id() -> str:
    """Sortable by start time, unique without coordination: '20261122T195733-3f9a1c2b'."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def sandbox_config(policy: Policy, workspace: Path) -> SandboxConfig:
    """The sandbox's view of the policy for one run."""
    limits = policy.limits
    return SandboxConfig(
        workspace=workspace,
        workspace_guest=policy.workspace.guest_path,
        grants=tuple(ReadOnlyGrant(g.host, g.guest) for g in policy.grants),
        limits=Limits(
            timeout_s=limits.timeout_s,
            memory_bytes=limits.memory_mib * 2**20,
            output_bytes=limits.output_bytes,
            code_bytes=limits.code_bytes,
            restore_timeout_s=limits.max_timeout_s,
        ),
        about=about_text(policy),
    )


@asynccontextmanager
async def open_run(policy: Policy, *, workspace: Path | None = None) -> AsyncIterator[Run]:
    """Start a run: make its workspace and audit log, open its sandbox; on exit close them.

    With `workspace` the given host folder (made if missing) is the workspace and is kept.
    Otherwise the run gets `<state>/runs/<id>/workspace`, removed at the end unless the
    policy says `workspace.keep`. The audit log `<state>/runs/<id>/audit.jsonl` is kept.
    """
    run_id = new_run_id()
    own = workspace is None
    run_dir = state_home() / "runs" / run_id
    folder = (run_dir / "workspace") if own else Path(workspace).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with AuditLog(run_dir / "audit.jsonl", run_id) as audit:
            audit.event("run_start", policy=policy.source, workspace=str(folder))
            try:
                async with SandboxSession(sandbox_config(policy, folder)) as session:
                    yield Run(run_id, policy, folder, audit, session)
            finally:
                audit.event("run_end")
    finally:
        if own and not policy.workspace.keep:
            shutil.rmtree(folder, ignore_errors=True)
