"""Running a cell in a test and checking how it ended."""

from __future__ import annotations

import anyio

from ubertool.runtime.runs import Run
from ubertool.sandbox import CellResult, SandboxSession, Status


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


async def run_interrupted(session: SandboxSession, code: str, after_s: float = 0.3) -> CellResult:
    """Run `code` in `session` and interrupt it (as a client's cancel would) after `after_s`."""
    async with anyio.create_task_group() as tg:
        async def stop_soon() -> None:
            await anyio.sleep(after_s)
            session.interrupt()
        tg.start_soon(stop_soon)
        return await session.run(code)
