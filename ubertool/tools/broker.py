"""What every host-tool broker shares: the run's recorder, redactor and audit sink, a lock,
and an exit stack closed with the run (and, for async libraries, an event loop of its own)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ubertool.tools import ToolFailure
from ubertool.tools.recorder import Recorder, recorded_call
from ubertool.tools.redact import Redactor
from ubertool.tools.tracing import span


class Broker:
    """A base for brokers; use as a context manager. `prefix` names its calls in recordings."""

    prefix = "tool"

    def __init__(self, *, recorder: Recorder, redactor: Redactor,
                 on_event: Callable[..., None] | None = None) -> None:
        self._recorder = recorder
        self._redactor = redactor
        self._on_event = on_event or (lambda *a, **k: None)
        self._stack = ExitStack()
        self._lock = threading.Lock()
        self._loop: BlockingPortal | None = None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _recorded(self, op: str, arguments: dict[str, Any],
                  perform: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Record the call (a replay answers it from the recording), audit what happened (a
        failure too, whatever it is) and trace it (a span with the tool's name, never its
        arguments or answer)."""
        tool = f"{self.prefix}.{op}"
        started = time.monotonic()
        with span("ubertool.tool.call", tool=tool):  # a failure marks it: error.type = ToolFailure
            try:
                answer = recorded_call(self._recorder, tool, arguments, perform)
            except ToolFailure as exc:
                self._on_event("tool_call", tool=tool, ok=False, error=str(exc)[:300],
                               duration_s=round(time.monotonic() - started, 6))
                raise
            except Exception as exc:  # a broker's own bug: the guest sees "internal error", the audit why
                self._on_event("tool_call", tool=tool, ok=False,
                               error=f"internal error: {type(exc).__name__}",
                               duration_s=round(time.monotonic() - started, 6))
                raise
        self._on_event("tool_call", tool=tool, ok=True, duration_s=round(time.monotonic() - started, 6))
        return answer

    def _event_loop(self) -> BlockingPortal:
        """The broker's own event-loop thread, started at first use (call with `_lock` held)."""
        if self._loop is None:
            self._loop = self._stack.enter_context(start_blocking_portal())
        return self._loop
