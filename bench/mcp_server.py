"""MCP server benchmarks: the `python` tool through real clients, beside the sandbox layer alone.

Prints medians, p99 and ratios to the in-process `SandboxSession` measured in the same run;
asserts nothing. Starts `ubertool serve` over stdio and over HTTP on 127.0.0.1.

    .venv/bin/python bench/mcp_server.py [--cells 500] [--sessions 16] [--per-session 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

sys.path.insert(0, str(Path(__file__).parent))
from sandbox import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import start_http_server

from ubertool.sandbox import Limits, SandboxConfig, SandboxSession

UBERTOOL = str(Path(sys.executable).with_name("ubertool"))


def line(name: str, median: float, p99: float, base: float) -> None:
    print(f"  {name:<38} median {median:8.3f} ms  p99 {p99:8.3f} ms  ratio to sandbox {median / base:6.2f}x")


async def timed_calls(client: Client, cells: int, session: str | None = None) -> list[float]:
    args: dict[str, Any] = {"code": "1"}
    if session:
        args["session"] = session
    samples = []
    for _ in range(cells):
        started = time.perf_counter()
        await client.call_tool("python", args)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def first_call(client: Client) -> tuple[float, str]:
    started = time.perf_counter()
    result = await client.call_tool("python", {"code": "x = 1"})
    return (time.perf_counter() - started) * 1000, result.structured_content["session"]


def start_http(policy: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_http_server(UBERTOOL, dict(os.environ), ["--policy", str(policy)])


async def bench(cells: int, sessions: int, per_session: int, folder: Path) -> None:
    async with SandboxSession(SandboxConfig(workspace=folder, limits=Limits())) as s:
        base_samples = []
        for _ in range(cells):
            started = time.perf_counter()
            await s.run("1")
            base_samples.append((time.perf_counter() - started) * 1000)
    base, base_p99 = stats(base_samples)
    print(f"trivial cell, {cells} calls each")
    print(f"  {'SandboxSession.run (baseline)':<38} median {base:8.3f} ms  p99 {base_p99:8.3f} ms")

    bare = str(Path(__file__).with_name("bare_fastmcp.py"))
    async with Client(StdioTransport(sys.executable, [bare])) as c:
        line("bare fastmcp tool over stdio (floor)", *stats(await timed_calls(c, cells)), base)
    async with Client(StdioTransport(UBERTOOL, ["serve"], env=dict(os.environ))) as c:
        new_stdio, _ = await first_call(c)
        line("MCP over stdio", *stats(await timed_calls(c, cells)), base)

    policy = folder / "bench-policy.toml"
    policy.write_text(f"[limits]\nmax_sessions = {sessions + 4}\n")
    proc, url = start_http(policy)
    try:
        async with Client(url) as c:
            new_http, handle = await first_call(c)
            line("MCP over HTTP", *stats(await timed_calls(c, cells, handle)), base)
        print("new session, first call")
        print(f"  stdio {new_stdio:8.1f} ms   HTTP {new_http:8.1f} ms")

        print(f"{sessions} concurrent sessions x {per_session} cells over HTTP")
        latencies: list[float] = []

        async def one_session() -> None:
            async with Client(url) as client:
                _, own = await first_call(client)
                latencies.extend(await timed_calls(client, per_session, own))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(sessions):
                tg.start_soon(one_session)
        wall = time.perf_counter() - started
        median, p99 = stats(latencies)
        print(f"  {len(latencies)} cells in {wall:.1f} s: {len(latencies) / wall:.0f} cells/s, "
              f"median {median:.2f} ms, p99 {p99:.2f} ms")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--per-session", type=int, default=200)
    args = parser.parse_args()
    print(f"ubertool MCP benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(bench, args.cells, args.sessions, args.per_session, Path(tmp))


if __name__ == "__main__":
    main()
