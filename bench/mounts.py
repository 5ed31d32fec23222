"""Mount benchmarks: reading through an `http` mount beside httpx on the host, in one run.

Serves files from a real HTTP server on 127.0.0.1 (the tests' fake API). Prints medians and
the ratio to httpx fetching the same bytes directly; asserts nothing.

    .venv/bin/python bench/mounts.py [--reads 20] [--small 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fakeapi import serve_api

sys.path.insert(0, str(Path(__file__).parent))
from table import record

from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run

MB = 2**20


async def bench(reads: int, small: int, folder: Path) -> None:
    with serve_api() as (url, state):
        for i in range(reads):
            state.files[f"/blob-{i}.bin"] = os.urandom(MB)
        for i in range(small):
            state.files[f"/small-{i}.txt"] = b"x" * 100
        state.files["/small.txt"] = b"x" * 100
        policy = folder / "policy.toml"
        policy.write_text(f"[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/remote'\n"
                          f"base_url = '{url}/v1'\n")

        direct, mounted, trivial = [], [], []
        # Interleaved, so that a loaded machine weighs on both alike.
        with httpx.Client() as client:
            async with open_run(load_policy(policy)) as run:
                for i in range(reads):
                    started = time.perf_counter()
                    client.get(f"{url}/v1/blob-{i}.bin").raise_for_status()
                    direct.append((time.perf_counter() - started) * 1000)
                    result = await run.cell(f"len(open('/remote/blob-{i}.bin', 'rb').read())")
                    assert str(result.value) == str(MB), result
                    mounted.append(result.duration_s * 1000)
                    trivial.append((await run.cell("1")).duration_s * 1000)
                # Fresh names: each read is one request. Then the same name: from the run's cache.
                await run.cell("open('/remote/small.txt', 'rb').read()")
                loop = (f"for i in range({small}):\n    open('/remote/small.txt', 'rb').read()")
                cached = (await run.cell(loop)).duration_s * 1000 / small
                fresh_loop = (f"for i in range({small}):\n    open(f'/remote/small-{{i}}.txt', 'rb').read()")
                fresh = (await run.cell(fresh_loop)).duration_s * 1000 / small

    m, d, t = statistics.median(mounted), statistics.median(direct), statistics.median(trivial)
    print(f"1 MiB read, median of {reads}")
    print(f"  through the mount (one cell) {m:8.2f} ms   httpx on the host {d:8.2f} ms   ratio {m / d:5.2f}x")
    print(f"  the read's share (that cell less a trivial cell, {t:.2f} ms)  {m - t:8.2f} ms   ratio "
          f"{(m - t) / d:5.2f}x")
    record("1 MiB read through an http mount (cell)", m, d, "httpx.get on the host, same server", ratio=1.5)
    record("  the same, less a trivial cell", m - t, d, "httpx.get on the host, same server", ratio=1.5)
    print(f"{small} small reads (100 bytes) in one cell, per read")
    print(f"  cached for the run {cached:8.3f} ms   each a new request {fresh:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20)
    parser.add_argument("--small", type=int, default=1000)
    args = parser.parse_args()
    print(f"ubertool mount benchmarks, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UBERTOOL_HOME", str(Path(tmp) / "home"))
        anyio.run(bench, args.reads, args.small, Path(tmp))


if __name__ == "__main__":
    main()
