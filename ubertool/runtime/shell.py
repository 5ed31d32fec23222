"""`ubertool shell`: an interactive REPL on one sandbox session.

The event loop runs in a blocking portal; the main thread reads lines, so Ctrl-C reaches it:
at the prompt it clears the input, during a cell it interrupts the cell (the session's state
is restored). Ctrl-D exits.
"""

from __future__ import annotations

import codeop
import concurrent.futures
import contextlib
import sys
from pathlib import Path

from anyio.from_thread import start_blocking_portal

from ubertool import __version__
from ubertool.runtime.journal import Journal
from ubertool.runtime.policy import Policy
from ubertool.runtime.render import render
from ubertool.runtime.runs import Run, open_run
from ubertool.sandbox import CellResult


def _complete(source: str) -> bool:
    """Whether `source` is a whole cell (a syntax error counts: the guest will report it)."""
    try:
        return codeop.compile_command(source, "<cell>", "single") is not None
    except (SyntaxError, ValueError, OverflowError):
        return True


def _read_cell() -> str | None:
    """One cell from the terminal, over several lines if needed; None at end of input."""
    lines: list[str] = []
    while True:
        try:
            line = input("... " if lines else ">>> ")
        except EOFError:
            if lines:
                return "\n".join(lines)
            return None
        lines.append(line)
        source = "\n".join(lines)
        if not lines[0].strip():
            return ""
        if _complete(source):
            return source


def _wait(future: concurrent.futures.Future[CellResult], run: Run) -> CellResult:
    while True:
        try:
            return future.result()
        except KeyboardInterrupt:
            run.session.interrupt()


def _banner(run: Run) -> str:
    return (f"ubertool {__version__}: Python in a WebAssembly sandbox (policy: "
            f"{run.policy.source}).\nYour files: {run.policy.workspace.guest_path} "
            f"(on the host: {run.workspace}). Ctrl-C interrupts a cell, Ctrl-D exits.")


def shell(policy: Policy, workspace: Path | None) -> None:
    """Run the REPL until end of input."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    with Journal.default(policy.journal) as journal, start_blocking_portal() as portal, \
            portal.wrap_async_context_manager(open_run(policy, workspace=workspace, journal=journal,
                                                       kind="shell")) as run:
        print(_banner(run), file=sys.stderr)
        while True:
            try:
                source = _read_cell()
            except KeyboardInterrupt:
                print("\nKeyboardInterrupt", file=sys.stderr)
                continue
            if source is None:
                print(file=sys.stderr)
                return
            if not source.strip():
                continue
            future = portal.start_task_soon(run.cell, source)
            result = _wait(future, run)
            render(result, sys.stdout, sys.stderr, show_value=True)
