"""The audit trail: one JSON object per line, per run, in `runs/<id>/audit.jsonl`.

Events name the run, the session handle, what happened and, when the client sent one, the
W3C `traceparent` of the request. Code is recorded by its SHA-256, never as text; the run's
secrets are redacted from every line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

from ubertool.tools.files import open_private
from ubertool.tools.redact import Redactor


def code_hash(code: str) -> str:
    return "sha256:" + hashlib.sha256(code.encode("utf-8", "replace")).hexdigest()


class AuditLog:
    """An append-only JSON-lines file; use as a context manager. Each event is flushed."""

    def __init__(self, path: Path, run_id: str, redactor: Redactor | None = None) -> None:
        self.path = path
        self.run_id = run_id
        self._redactor = redactor
        self._file: IO[str] | None = None

    def __enter__(self) -> AuditLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(open_private(self.path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event; fields that are None are left out."""
        if self._file is None:
            raise RuntimeError("the audit log is closed")
        record = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                  "run": self.run_id, "event": kind}
        record.update({key: value for key, value in fields.items() if value is not None})
        line = json.dumps(record, ensure_ascii=False, default=str)
        if self._redactor is not None:
            line = self._redactor.text(line)
        self._file.write(line + "\n")
        self._file.flush()
