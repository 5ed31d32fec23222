"""Cell results for people at a terminal: output as the guest printed it, problems on stderr."""

from __future__ import annotations

from typing import TextIO

from ubertool.sandbox import CellResult, RestoreReport, Status


def restore_note(report: RestoreReport) -> str:
    if report.ok:
        return f"state restored: {report.cells} earlier cells replayed in {report.seconds:.2f} s"
    return (f"state partly restored: {report.cells} cells replayed in {report.seconds:.2f} s, "
            f"then {report.reason}; later variables are gone")


def render(result: CellResult, out: TextIO, err: TextIO, *, show_value: bool) -> None:
    """Write a cell's stdout, value, stderr, traceback and status note."""
    out.write(str(result.stdout))
    if show_value and result.value is not None:
        out.write(str(result.value) + "\n")
    out.flush()
    err.write(str(result.stderr))
    if result.error is not None:
        err.write(result.error.traceback)
    for note in result.notes:
        err.write(f"[ubertool] {note}\n")
    if result.status not in (Status.OK, Status.ERROR, Status.MEMORY):
        note = result.message or f"output over the cap of the policy ({result.status})"
        if result.restored is not None:
            note += f"; {restore_note(result.restored)}"
        err.write(f"[{result.status}] {note}\n")
    err.flush()
