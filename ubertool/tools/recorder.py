"""The one seam every crossing to the outside goes through: live, it performs and records;
replaying, it answers from a recording and performs nothing.

Restore after a timeout replays earlier cells with their recorded exchanges, so no request is
sent twice; playbooks' offline replay uses the same mechanism. Exchanges are matched by kind
and request, in order; a mismatch is raised, never guessed around.

With a `Redactor`, every exchange passes it before it is kept or answered: the journal, the
playbooks dumped from it and the guest all get the same redacted record, live or replayed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ubertool.tools import ToolFailure
from ubertool.tools.redact import Redactor

Json = dict[str, Any]


@dataclass(frozen=True)
class Exchange:
    """One crossing: what was asked (`request`) and what came back (`response`): JSON values,
    and bytes for bodies (whoever stores an exchange encodes those)."""

    kind: str
    request: Json
    response: Json


class ReplayMismatch(RuntimeError):
    """A replayed cell asked for something other than what the recording holds next."""


class Recorder:
    """Records a session's exchanges; thread-safe (a cell's turn runs on a worker thread)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        self._redactor = redactor
        self._log: list[Exchange] = []
        self._replay: deque[Exchange] | None = None
        self._lock = threading.Lock()
        self.mismatch: str = ""

    def exchange(self, kind: str, request: Json, perform: Callable[[], Json]) -> Json:
        """The response to `request`: performed and recorded live, or read from the recording;
        both redacted when the recorder has a redactor (a replay is matched redacted too).

        Raises:
            ReplayMismatch: replaying, and the recording holds something else next.
        """
        with self._lock:
            replay = self._replay
        if self._redactor is not None:
            request = self._redactor.json(request)
        if replay is None:
            response = perform()
            if self._redactor is not None:
                response = self._redactor.json(response)
            with self._lock:
                self._log.append(Exchange(kind, request, response))
            return response
        with self._lock:
            expected = replay.popleft() if replay else None
            if expected is None or expected.kind != kind or expected.request != request:
                held = "nothing more" if expected is None else f"{expected.kind} {expected.request}"
                self.mismatch = f"the replay asked for {kind} {request}, but the recording holds {held}"
                raise ReplayMismatch(self.mismatch)
            self._log.append(expected)
            return expected.response

    def take(self) -> tuple[Exchange, ...]:
        """The exchanges since the last `take`, and forget them."""
        with self._lock:
            log, self._log = tuple(self._log), []
        return log

    @contextmanager
    def replaying(self, exchanges: Iterable[Exchange]) -> Iterator[None]:
        """Answer every exchange in the block from `exchanges`, in order."""
        with self._lock:
            self._replay = deque(exchanges)
            self.mismatch = ""
        try:
            yield
        finally:
            with self._lock:
                self._replay = None
                self._log = []


def recorded_call(recorder: Recorder, tool: str, arguments: Json, perform: Callable[[], Json]) -> Json:
    """A host tool's call through `recorder`: its answer, or its `ToolFailure` (recorded as
    an answer too, so a replay fails the same way)."""
    def attempt() -> Json:
        try:
            return perform()
        except ToolFailure as exc:
            return {"error": str(exc)}

    answer = recorder.exchange("tool", {"tool": tool, "arguments": arguments}, attempt)
    if "error" in answer:
        raise ToolFailure(answer["error"])
    return answer
