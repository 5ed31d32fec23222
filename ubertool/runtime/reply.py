"""A cell's result as an MCP tool result: concise text, images, and the same fields structured.

Each part of the text (stdout, stderr, value, traceback) is cut to the policy's `reply_bytes`,
head and tail kept; the whole part is then saved in the workspace, and the text says where.
"""

from __future__ import annotations

import base64
from typing import Any

from fastmcp.tools import ToolResult
from mcp.types import ImageContent, TextContent

from ubertool.runtime.render import restore_note
from ubertool.runtime.runs import Run
from ubertool.sandbox import CellResult, Status
from ubertool.tools.files import write_no_follow

SAVED_DIR = ".ubertool"


def _fit(text: str, run: Run, cell: int, part: str) -> tuple[str, str | None]:
    """The text to show and, when it was cut, the guest path holding all of it."""
    cap = run.policy.limits.reply_bytes
    data = text.encode("utf-8", "replace")
    if len(data) <= cap:
        return text, None
    name = f"cell-{cell}-{part}.txt"
    guest: str | None = f"{run.policy.workspace.guest_path}/{SAVED_DIR}/{name}"
    try:
        write_no_follow(run.workspace / SAVED_DIR, name, data)
        where = f"all of it is in {guest}"
    except OSError:
        guest, where = None, "it could not be saved"
    half = cap // 2
    head, tail = data[:half].decode("utf-8", "replace"), data[-half:].decode("utf-8", "replace")
    return f"{head}\n[... {len(data) - 2 * half} bytes not shown; {where} ...]\n{tail}", guest


def saves(result: CellResult, run: Run) -> bool:
    """Whether `reply` would save a part in the workspace (a file write: keep it off the event
    loop). Cheap: a part of n characters is at most 4n bytes of UTF-8."""
    cap = run.policy.limits.reply_bytes
    parts = (result.stdout, result.stderr, result.value, result.error.traceback if result.error else None)
    return any(part is not None and 4 * len(str(part)) > cap
               and len(str(part).encode("utf-8", "replace")) > cap for part in parts)


def _status_line(result: CellResult) -> str:
    if result.status in (Status.OK, Status.ERROR, Status.MEMORY):
        return ""
    note = result.message or "the output passed the policy's output_bytes; its middle was dropped"
    if result.restored is not None:
        note += f"; {restore_note(result.restored)}"
    return f"[{result.status}] {note}"


def reply(handle: str, result: CellResult, run: Run) -> ToolResult:
    """The tool result for one cell; `is_error` when the cell failed."""
    saved: dict[str, str] = {}
    shown: dict[str, str | None] = {}
    sources = {"stdout": str(result.stdout), "stderr": str(result.stderr),
               "value": None if result.value is None else str(result.value),
               "traceback": result.error.traceback if result.error else None}
    for part, text in sources.items():
        if not text:
            shown[part] = text
            continue
        shown[part], path = _fit(text, run, result.cell, part)
        if path:
            saved[part] = path
    lines = [shown["stdout"], shown["stderr"] and f"[stderr]\n{shown['stderr']}", shown["traceback"],
             shown["value"], *(f"[ubertool] {note}" for note in result.notes), _status_line(result)]
    footer = f"[session {handle}, cell {result.cell}, {result.duration_s:.2f} s]"
    text = "\n".join(line.rstrip("\n") for line in lines if line) + ("\n" if any(lines) else "")
    content: list[Any] = [TextContent(type="text", text=text + footer)]
    content += [ImageContent(type="image", mimeType="image/png", data=base64.b64encode(png).decode())
                for png in result.images]
    return ToolResult(content=content, structured_content=structured(handle, result, shown, saved),
                      is_error=result.failed)


def structured(handle: str, result: CellResult, shown: dict[str, str | None],
               saved: dict[str, str]) -> dict[str, Any]:
    error = result.error
    restored = result.restored
    return {
        "session": handle,
        "cell": result.cell,
        "status": str(result.status),
        "stdout": shown["stdout"],
        "stderr": shown["stderr"],
        "value": shown["value"],
        "error": None if error is None else {"type": error.type, "message": error.message,
                                             "traceback": shown["traceback"]},
        "message": result.message,
        "duration_s": round(result.duration_s, 6),
        "images": len(result.images),
        "notes": list(result.notes),
        "restored": None if restored is None else {
            "cells": restored.cells, "seconds": round(restored.seconds, 6), "ok": restored.ok,
            "failed_at": restored.failed_at, "reason": restored.reason},
        "saved": saved,
    }


def refusal(message: str, *, status: str = "denied") -> ToolResult:
    """A call that ran no cell to its end (no session could be had: `denied`; the server is
    stopping: `cancelled`); an error result, not a protocol error."""
    return ToolResult(content=[TextContent(type="text", text=message)],
                      structured_content={"status": status, "message": message}, is_error=True)
