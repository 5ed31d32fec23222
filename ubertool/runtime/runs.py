"""A run: the unit of work (one MCP session, one `ubertool run` or `shell`, one replay).

A run owns its id, the effective policy, its workspace folder, its audit log, its journal
entries, its credentials (minted for it, revoked after it), its recorder and its sandbox
session. Everything it hands back (cell results, audit events, journal) passes its `Redactor`
first. The guest's `ubertool.save_playbook(...)` is a host tool of the run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ubertool.playbooks.dump import dump, write_playbook
from ubertool.playbooks.format import PlaybookError
from ubertool.runtime.about import about_text
from ubertool.runtime.audit import AuditLog, code_hash
from ubertool.runtime.home import state_folder
from ubertool.runtime.journal import Journal, JournalCell
from ubertool.runtime.policy import DirMount, Policy
from ubertool.runtime.stores import JournalError
from ubertool.runtime.telemetry import CELLS, ERRORS, RESTORES
from ubertool.sandbox import (
    CellError,
    CellResult,
    HostFolder,
    Limits,
    ProviderMount,
    Resume,
    SandboxConfig,
    SandboxSession,
    SandboxStartError,
    Text,
)
from ubertool.tools import ToolFailure
from ubertool.tools.browser import BrowserBroker
from ubertool.tools.credentials import CredentialBroker
from ubertool.tools.files import cache_home, open_private, private_folder, remove_tree
from ubertool.tools.packages import PACKAGES_GUEST, PackageBroker, PackageError, installs_in
from ubertool.tools.programs import ProgramBroker
from ubertool.tools.recorder import Exchange, Recorder, Spool, recorded_call
from ubertool.tools.redact import Redactor
from ubertool.tools.tracing import audit_ids, failed, span
from ubertool.tools.upstream import UpstreamBroker


@dataclass
class RunRecord:
    """What a run has done so far (mutable; the journal holds the durable copy)."""

    id: str
    kind: str
    policy: Policy
    cells: list[JournalCell] = field(default_factory=list)
    session: str | None = None
    principal: str | None = None  # who opened it, for a server's run
    packages: list[str] = field(default_factory=list)  # `name==version` the session started with
    suspended: bool = False  # saved to resume after a restart: its folders outlive this process


@dataclass(frozen=True)
class Resumed:
    """A run that a stopped server saved, to go on with (`open_run(resume=...)`): its id, its
    journaled cells, and what its sandbox session resumes from."""

    run_id: str
    cells: tuple[JournalCell, ...]
    session: Resume


@dataclass(frozen=True)
class Run:
    """One run and its live sandbox session."""

    id: str
    policy: Policy
    workspace: Path
    audit: AuditLog
    redactor: Redactor
    session: SandboxSession
    record: RunRecord
    journal: Journal | None = None

    def name_session(self, handle: str) -> None:
        """Record the MCP session handle this run serves."""
        self.record.session = handle
        if self.journal is not None:
            self.journal.name_session(self.id, handle)

    def timeout_for(self, asked: float | None) -> float:
        """The time limit of a cell: what the caller asked, capped by the policy."""
        limits = self.policy.limits
        return limits.timeout_s if asked is None else min(asked, limits.max_timeout_s)

    async def cell(self, code: str, *, timeout_s: float | None = None, echo: bool = True,
                   traceparent: str | None = None) -> CellResult:
        """Run one cell in this run's session, with its audit events and its span (see
        `SandboxSession.run`). The result has every secret of the run replaced by
        `[redacted:NAME]`."""
        with audit_ids(run=self.id, session=self.record.session), \
                span("ubertool.cell", code_sha256=code_hash(code)) as current:
            result = await self._cell(code, timeout_s, echo, traceparent)
            current.set_attributes({"ubertool.cell": result.cell, "ubertool.status": str(result.status)})
            if result.failed:
                failed(current, result.error.type if result.error else str(result.status))
        CELLS.add(1, {"status": str(result.status)})
        if result.failed:
            ERRORS.add(1, {"kind": "cell"})
        if result.restored is not None:
            RESTORES.add(1, {"ok": result.restored.ok})
        return result

    async def _cell(self, code: str, timeout_s: float | None, echo: bool,
                    traceparent: str | None) -> CellResult:
        timeout = self.timeout_for(timeout_s)
        self.audit.event("cell_start", code=code_hash(code), timeout_s=timeout, traceparent=traceparent)
        try:
            result = redacted(await self.session.run(code, timeout_s=timeout, echo=echo), self.redactor)
        except BaseException as exc:
            self.audit.event("cell_abandoned", reason=type(exc).__name__, traceparent=traceparent)
            raise
        journaled = JournalCell.of(self.redactor.text(code), result, result.exchanges)
        self.record.cells.append(journaled)
        if self.journal is not None:
            try:
                self.journal.add_cell(self.id, journaled)
            except (JournalError, OSError) as exc:  # a full disk, a lost database: the result counts
                note = f"the journal could not record this cell ({exc}); it is not in playbooks dumped later"
                self.audit.event("journal_failed", cell=result.cell, error=str(exc))
                ERRORS.add(1, {"kind": "journal"})
                result = replace(result, notes=(*result.notes, note))
        restored = result.restored
        self.audit.event(
            "cell_end", cell=result.cell, status=str(result.status), duration_s=round(result.duration_s, 6),
            error=result.error.type if result.error else None, traceparent=traceparent,
            notes=list(result.notes) or None, restored_cells=restored.cells if restored else None,
            restore_ok=restored.ok if restored else None)
        return result


def redacted(result: CellResult, redactor: Redactor) -> CellResult:
    """`result` with the run's secrets removed from every text it carries."""
    def text(value: Text | None) -> Text | None:
        if value is None:
            return None
        return Text(redactor.text(value.head), redactor.text(value.tail), value.dropped)

    error = result.error
    if error is not None:
        error = CellError(error.type, redactor.text(error.message), redactor.text(error.traceback))
    return replace(result, stdout=text(result.stdout), stderr=text(result.stderr), value=text(result.value),
                   error=error, notes=tuple(redactor.text(n) for n in result.notes))


def new_run_id() -> str:
    """Sortable by start time, unique without coordination: '20261122T195733-3f9a1c2b'."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def _limits(policy: Policy) -> Limits:
    limits = policy.limits
    return Limits(timeout_s=limits.timeout_s, memory_bytes=limits.memory_mib * 2**20,
                  output_bytes=limits.output_bytes, code_bytes=limits.code_bytes,
                  restore_timeout_s=limits.max_timeout_s, open_files=limits.open_files,
                  tool_calls=limits.tool_calls, workspace_bytes=policy.workspace.quota_mib * 2**20)


def source_facts(record: RunRecord) -> dict[str, Any]:
    """What a playbook's header says of the run it came from (names only, never secrets)."""
    policy = record.policy
    return {"run": record.id,
            "policy": str(policy.path) if policy.path else None, "policy_sha256": policy.sha256,
            "mounts": [f"{m.name} ({m.kind} {m.guest})" for m in policy.mounts],
            "credentials": sorted(policy.credentials),
            "packages": sorted({*record.packages,
                                *(e for cell in record.cells for e in installs_in(cell.exchanges))}),
            "ubertool": shutil.which("ubertool") or str(Path(sys.executable).with_name("ubertool"))}


def cached_packages(policy: Policy) -> list[str]:
    """`name==version` a session of `policy` starts with, from the package cache alone ([] when
    it has not been resolved yet): for a playbook dumped after its run ended."""
    broker = PackageBroker(policy.packages, cache_home(), offline=True)
    if not broker.wanted:
        return []
    return [pin.exact for pin in broker.cache.cached(broker.preloaded()) or ()]


def playbook_tool(record: RunRecord, recorder: Recorder) -> Callable[..., dict[str, Any]]:
    """The host side of the guest's `ubertool.save_playbook`."""
    def save_playbook(name: str, description: str = "",
                      params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Save this session's successful cells as a playbook a person replays from a shell.

        Args:
            name: The playbook's name: letters, digits, '.', '_' and '-'.
            description: One line on what it does.
            params: Top-level variables a person may override when replaying, with their defaults.
        """
        arguments = {"name": name, "description": description, "params": params or {}}

        def perform() -> dict[str, Any]:
            try:
                text, recording = dump(record.cells, name=name, description=description,
                                       params=params or {}, source=source_facts(record))
                path = write_playbook(playbooks_home() / f"{name}.py", text, recording, run=record.id)
            except PlaybookError as exc:
                raise ToolFailure(str(exc)) from None
            if record.principal is not None:  # whose session saved it, for playbook:// listings
                with open(open_private(playbooks_home() / f"{name}{OWNER_SUFFIX}", os.O_WRONLY | os.O_TRUNC),
                          "w", encoding="utf-8") as owner:
                    owner.write(record.principal + "\n")
            return {"playbook": name, "path": str(path), "cells": len(recording["cells"]),
                    "replay": f"ubertool replay {path}"}

        return recorded_call(recorder, "save_playbook", arguments, perform)
    return save_playbook


def playbooks_home() -> Path:
    return state_folder("playbooks")


OWNER_SUFFIX = ".owner"  # beside NAME.py: the principal whose session saved it


def playbook_owner(name: str) -> str | None:
    """The principal that saved playbook `name` from a server's session; None when no server
    session did (saved from a shell, dumped by the CLI, copied in by hand, or absent)."""
    try:
        return (playbooks_home() / f"{name}{OWNER_SUFFIX}").read_text("utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


@contextmanager
def sandbox_config(policy: Policy, workspace: Path, audit: AuditLog, redactor: Redactor,
                   record: RunRecord, spool: Spool, replay: Sequence[Exchange] | None = None,
                   pins: dict[str, str] | None = None, offline: bool = False,
                   root: Path | None = None) -> Iterator[SandboxConfig]:
    """The sandbox's view of the policy for one run, with the run's brokers (closed on exit).
    Response bodies are kept in `spool`, not memory. With `replay`, every outside exchange is
    answered from it and nothing is sent. `pins` (name -> version) fix the packages' versions;
    `offline` fetches none (they must be cached).

    Raises:
        PackageError: the policy's packages cannot be given (named), e.g. offline and not cached.
    """
    recorder = Recorder(redactor)  # what the journal keeps is redacted as the guest sees it
    folders = [HostFolder(g.host, g.guest) for g in policy.grants]
    folders += [HostFolder(m.host, m.guest, m.writable) for m in policy.mounts if isinstance(m, DirMount)]
    with ExitStack() as stack:
        if replay is not None:
            stack.enter_context(recorder.replaying(replay))
        credentials = stack.enter_context(CredentialBroker(dict(policy.credentials), redactor,
                                                           on_event=audit.event))
        programs = stack.enter_context(ProgramBroker(dict(policy.tools.programs), workspace,
                                                     recorder=recorder, redactor=redactor,
                                                     on_event=audit.event))
        browser = stack.enter_context(BrowserBroker(policy.tools.browser, workspace,
                                                    policy.workspace.guest_path, credentials=credentials,
                                                    recorder=recorder, redactor=redactor,
                                                    on_event=audit.event))
        upstream = stack.enter_context(UpstreamBroker(dict(policy.tools.mcp), logs=audit.path.parent,
                                                      credentials=credentials,
                                                      recorder=recorder, redactor=redactor,
                                                      on_event=audit.event))
        packages = stack.enter_context(PackageBroker(policy.packages, cache_home(), pins=pins,
                                                     offline=offline, recorder=recorder,
                                                     on_event=audit.event))
        record.packages = packages.installed
        if packages.site is not None:
            folders.append(HostFolder(packages.site.folder, PACKAGES_GUEST))
        mounts = []
        for spec in policy.mounts:
            if isinstance(spec, DirMount):
                continue
            from ubertool.tools.mounts.http import HttpMount  # its HTTP client: only when used

            provider = HttpMount(spec, credentials=credentials, recorder=recorder, redactor=redactor,
                                 spool=spool, on_event=audit.event)
            stack.callback(provider.close)
            mounts.append(ProviderMount(spec.guest, provider, spec.writable))
        yield SandboxConfig(workspace=workspace, workspace_guest=policy.workspace.guest_path,
                            folders=tuple(folders), mounts=tuple(mounts), recorder=recorder,
                            tools=(playbook_tool(record, recorder), *programs.tools(), *browser.tools(),
                                   *upstream.tools(), *packages.tools()),
                            limits=_limits(policy), about=about_text(policy, packages.installed),
                            import_path=(PACKAGES_GUEST,) if packages.site is not None else (),
                            template=policy.sessions.template, root=root)


@contextmanager
def _packages_named() -> Iterator[None]:
    """A package problem, as the sandbox's failure to start (with what to do)."""
    try:
        yield
    except PackageError as exc:
        raise SandboxStartError(f"packages: {exc}") from None


@asynccontextmanager
async def open_run(policy: Policy, *, workspace: Path | None = None, journal: Journal | None = None,
                   kind: str = "run", replay: Sequence[Exchange] | None = None,
                   principal: str | None = None, pins: dict[str, str] | None = None,
                   offline: bool = False, resume: Resumed | None = None) -> AsyncIterator[Run]:
    """Start a run: make its workspace, audit log and brokers, open its sandbox; on exit close
    them all (credentials are revoked then). `kind` (mcp, run, shell, replay) goes to the
    journal, when one is given; `replay` answers outside exchanges from a recording;
    `principal` (a server's client) is audited and owns the playbooks the run saves; `pins`
    fix package versions (a playbook's); `offline` fetches no package; `resume` goes on with a
    run a stopped server saved (its id, workspace, private root and cells; the journal's row
    is used as it is, and marked ended again when this run ends).

    Raises:
        SandboxStartError: the sandbox, or the policy's packages, could not be set up.

    With `workspace` the given host folder (made if missing) is the workspace and is kept.
    Otherwise the run gets `<state>/runs/<id>/workspace`, removed at the end unless the
    policy says `workspace.keep`. The guest's private root (its /tmp and HOME) is
    `<state>/runs/<id>/root`, removed at the end. A run whose record says `suspended` when it
    ends keeps both. The audit log `<state>/runs/<id>/audit.jsonl` is kept.
    """
    run_id = resume.run_id if resume is not None else new_run_id()
    own = workspace is None
    run_dir = state_folder("runs", run_id)
    root = private_folder(run_dir / "root")
    if own:
        folder = private_folder(run_dir / "workspace")
    else:
        folder = Path(workspace).resolve()
        folder.mkdir(parents=True, exist_ok=True)
    redactor = Redactor()
    record = RunRecord(run_id, kind, policy, principal=principal,
                       cells=list(resume.cells) if resume is not None else [])
    spool = Spool(run_dir / "bodies")
    try:
        with AuditLog(run_dir / "audit.jsonl", run_id, redactor) as audit, \
                _packages_named(), \
                sandbox_config(policy, folder, audit, redactor, record, spool, replay, pins,
                               offline, root) as config:
            audit.event("run_start", run_kind=kind, policy=policy.source, workspace=str(folder),
                        principal=principal, resumed=resume is not None or None)
            if journal is not None and resume is None:
                journal.start_run(run_id, kind, policy.source, policy.sha256)
            elif journal is not None:
                journal.reopen_run(run_id)
            try:
                # A replay ends at its first failed cell, so it is never restored: no images.
                config = replace(config, keep_images=kind != "replay")
                async with SandboxSession(config, resume=resume.session if resume else None) as session:
                    yield Run(run_id, policy, folder, audit, redactor, session, record, journal)
            finally:
                audit.event("run_end", suspended=record.suspended or None)
                if journal is not None:
                    try:
                        journal.end_run(run_id)
                    except JournalError as exc:  # the database is away: the run still ends
                        audit.event("journal_failed", error=str(exc))
                        ERRORS.add(1, {"kind": "journal"})
    finally:
        spool.close()
        with contextlib.suppress(OSError):  # left behind, they are still owner-only
            if not record.suspended:
                remove_tree(root)
            if own and not policy.workspace.keep and not record.suspended:
                remove_tree(folder)
