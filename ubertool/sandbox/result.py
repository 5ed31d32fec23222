"""What a cell produces: its status, its output, its error and, after a limit, the restore."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ubertool.tools.recorder import Exchange


class Status(StrEnum):
    """How a cell ended; a closed set.

    - `ok`: it ran to its end.
    - `error`: it raised; `CellResult.error` says what.
    - `timeout`: it passed its time limit and was stopped; the state was restored.
    - `memory`: it ran out of the session's memory (a `MemoryError` in the guest).
    - `output_truncated`: it ran to its end, but wrote more than the output cap.
    - `cancelled`: it was interrupted (Ctrl-C, a client's cancellation); the state was restored.
    - `denied`: the policy refused it: before it ran (code over the size cap), or while it
      ran (it wrote past the workspace quota: it was stopped, and what it wrote emptied).
    - `crashed`: the interpreter died under it (a trap, `os._exit`, `exit()`, a broken
      guest runtime); the state was restored from the earlier cells.
    """

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    OUTPUT_TRUNCATED = "output_truncated"
    CANCELLED = "cancelled"
    DENIED = "denied"
    CRASHED = "crashed"


# Cells that ran to their end inside the interpreter; only these are replayed by a restore.
COMPLETED = frozenset({Status.OK, Status.ERROR, Status.MEMORY, Status.OUTPUT_TRUNCATED})


@dataclass(frozen=True)
class Text:
    """Captured text that kept its head and tail: `dropped` bytes were cut from the middle."""

    head: str = ""
    tail: str = ""
    dropped: int = 0

    def __str__(self) -> str:
        if not self.dropped:
            return self.head + self.tail
        return f"{self.head}\n[... {self.dropped} bytes dropped ...]\n{self.tail}"

    @classmethod
    def whole(cls, text: str) -> Text:
        return cls(head=text)


@dataclass(frozen=True)
class CellError:
    """An exception raised by a cell: its type, message and the guest-only traceback."""

    type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class RestoreReport:
    """How the session's state was rebuilt after a cell ended it.

    `cells` were replayed in `seconds`. `ok` is false when a replayed cell did not end as it
    first did (`failed_at` names it): the state then holds only the cells before that one.
    """

    cells: int
    seconds: float
    ok: bool = True
    failed_at: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class CellResult:
    """The outcome of one cell.

    `cell` is the cell's number in its session (like Jupyter's `In [n]`). `value` is the repr
    of a final expression, if any. `stdout` and `stderr` keep their head and tail within the
    policy's output cap. `images` are the PNG figures left open at the cell's end; `notes` say
    why the host refused a mount request (the guest itself only sees an errno); `exchanges` are
    the crossings to the outside the cell caused, as recorded. `restored`
    is set when the cell ended the interpreter and the session was rebuilt before this result
    was returned.
    """

    cell: int
    status: Status
    stdout: Text
    stderr: Text
    value: Text | None
    error: CellError | None
    duration_s: float
    message: str = ""
    images: tuple[bytes, ...] = ()
    notes: tuple[str, ...] = ()
    exchanges: tuple[Exchange, ...] = ()
    restored: RestoreReport | None = None

    @property
    def failed(self) -> bool:
        return self.status not in (Status.OK, Status.OUTPUT_TRUNCATED)
