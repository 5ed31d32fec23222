"""Soak: many concurrent MCP sessions sending mixed cells (including timeouts and errors) for a
while, against one `ubertool serve --transport http` on loopback.

Reports cells sent, answered and lost (must be 0), state errors (a session that forgot its own
counter; must be 0), latency median and p99, and the server's RSS after warm-up and at the end
(must stay flat). The last line is the same summary as JSON. Exit code 1 if anything was lost.

    .venv/bin/python bench/soak.py [--sessions 32] [--seconds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastmcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import start_http_server

UBERTOOL = str(Path(sys.executable).with_name("ubertool"))
MIX = [  # (weight, code, timeout_s)
    (50, "counter += 1\ncounter", None),
    (15, "sum(i * i for i in range(20000))", None),
    (10, "print('line\\n' * 200)", None),
    (10, "1 / 0", None),
    (5, "import json\njson.dumps({'a': list(range(100))})", None),
    (5, "while True: pass", 0.3),
    (5, "open('/workspace/scratch.txt', 'w').write('x' * 1000)", None),
]


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    state_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def session(url: str, until: float, tally: Tally, rng: random.Random) -> None:
    async with Client(url, timeout=60) as client:
        first = await client.call_tool("python", {"code": "counter = 0"})
        handle = first.structured_content["session"]
        expected = 0
        weights = [w for w, _, _ in MIX]
        while time.monotonic() < until:
            _, code, timeout = rng.choices(MIX, weights)[0]
            args = {"code": code, "session": handle, **({"timeout_s": timeout} if timeout else {})}
            tally.sent += 1
            started = time.perf_counter()
            try:
                result = await client.call_tool("python", args, raise_on_error=False)
            except Exception:
                tally.lost += 1
                continue
            tally.latencies.append((time.perf_counter() - started) * 1000)
            tally.answered += 1
            status = (result.structured_content or {}).get("status", "none")
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if code.startswith("counter"):
                expected += 1
                if result.structured_content.get("value") != str(expected):
                    tally.state_errors += 1
                    expected = int(result.structured_content.get("value") or expected)


def start_server(home: Path, sessions: int) -> tuple[subprocess.Popen[bytes], str]:
    policy = home / "soak-policy.toml"
    # One principal (no auth) holds every session: its cap must allow them all, or the soak
    # measures evictions.
    policy.write_text(f"[limits]\nmax_sessions = {sessions + 4}\nmemory_mib = 256\n\n"
                      f"[server]\nmax_sessions_per_principal = {sessions + 4}\n")
    return start_http_server(UBERTOOL, {**os.environ, "UBERTOOL_HOME": str(home)}, ["--policy", str(policy)])


async def soak(sessions: int, seconds: float, home: Path) -> dict[str, object]:
    proc, url = start_server(home, sessions)
    tally = Tally()
    try:
        warm_until = time.monotonic() + seconds / 5  # every session open and past its first restores
        async with anyio.create_task_group() as tg:
            for n in range(sessions):
                tg.start_soon(session, url, time.monotonic() + seconds, tally, random.Random(n))
            await anyio.sleep(warm_until - time.monotonic())
            rss_start = rss_kib(proc.pid)
        rss_end = rss_kib(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies = sorted(tally.latencies) or [0.0]
    return {"sessions": sessions, "seconds": seconds, "sent": tally.sent, "answered": tally.answered,
            "lost": tally.lost, "state_errors": tally.state_errors, "server_alive": alive,
            "median_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
            "rss_start_mib": round(rss_start / 1024, 1), "rss_end_mib": round(rss_end / 1024, 1),
            "rss_growth": round((rss_end - rss_start) / max(rss_start, 1), 3), "statuses": tally.statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = anyio.run(soak, args.sessions, args.seconds, Path(tmp))
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"ubertool soak, {when}: {args.sessions} sessions for {args.seconds:g} s")
    print(f"  cells sent {summary['sent']}, answered {summary['answered']}, lost {summary['lost']}, "
          f"state errors {summary['state_errors']}")
    print(f"  latency median {summary['median_ms']} ms, p99 {summary['p99_ms']} ms")
    print(f"  server RSS after warm-up {summary['rss_start_mib']} MiB, at the end "
          f"{summary['rss_end_mib']} MiB ({summary['rss_growth']:+.1%})")
    print(f"  statuses {summary['statuses']}")
    print(json.dumps(summary))
    sys.exit(1 if summary["lost"] or summary["state_errors"] or not summary["server_alive"] else 0)


if __name__ == "__main__":
    main()
