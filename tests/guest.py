"""Running a cell in a test and checking how it ended."""

from __future__ import annotations

from ubertool.runtime.runs import Run
from ubertool.sandbox import Status


async def ok(run: Run, code: str) -> str:
    """The value of a cell that must succeed."""
    result = await run.cell(code)
    assert result.status is Status.OK, (result.error, result.message, result.stdout)
    return str(result.value)


async def refused(run: Run, code: str) -> str:
    """The message of a host tool's refusal, which the cell must end with."""
    result = await run.cell(code)
    assert result.status is Status.ERROR and result.error is not None
    assert result.error.type == "host.ToolError", result.error
    return result.error.message
