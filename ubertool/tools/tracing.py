"""Spans for the host side, on the OpenTelemetry API alone: without an SDK (the runtime
installs one only when telemetry is configured) every span is a no-op costing a few
microseconds.

What a span records, and only this: its name, the audit ids of the run it serves
(`ubertool.run`, `ubertool.session`, set by the runtime with `audit_ids`), and the names and
outcomes its caller passes (a mount's or credential's or tool's name, an HTTP method and
status, an error's type). Never a secret, cell code or output, a request's or response's body,
an argument's value or an exception's message (which may quote any of those): a failed span
carries `error.type` only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

Attribute = str | int | float | bool | None

_tracer = trace.get_tracer("ubertool")
# The audit ids of the run the current code serves; a copy travels with the context into the
# cell's worker thread, where host tools run.
_ids: ContextVar[dict[str, Attribute]] = ContextVar("ubertool_audit_ids", default={})  # noqa: B039


@contextmanager
def audit_ids(**ids: Attribute) -> Iterator[None]:
    """Put `ids` (e.g. run=..., session=...) on every span started in the block."""
    token = _ids.set({**_ids.get(), **ids})
    try:
        yield
    finally:
        _ids.reset(token)


@contextmanager
def span(name: str, **attributes: Attribute) -> Iterator[Span]:
    """A span named `name`, current in the block, with the audit ids and `attributes` (each
    as `ubertool.KEY`; None is left out). An exception leaving the block marks it failed with
    its type only, and propagates."""
    fields = {f"ubertool.{key}": value for key, value in {**_ids.get(), **attributes}.items()
              if value is not None}
    with _tracer.start_as_current_span(name, attributes=fields, record_exception=False,
                                       set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            failed(current, type(exc).__name__)
            raise


def failed(current: Span, error_type: str) -> None:
    """Mark `current` failed, naming only the kind of error (never a message)."""
    current.set_attribute("error.type", error_type)
    current.set_status(Status(StatusCode.ERROR))
