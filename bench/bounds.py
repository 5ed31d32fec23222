"""What a guest can make the host hold: a 1 MiB mount file read 200 times; 1 GiB written under a quota.

Prints the host's RSS growth and the journal's growth beside the file's own size (the floor:
one copy), measured in this run; asserts nothing. Target (issue 13): under 20 MiB each.

    .venv/bin/python bench/bounds.py [--reads 200]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fakeapi import serve_api

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run

MIB = 2**20


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def journal_mib(path: Path) -> float:
    """The journal with its WAL, as it stands."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*")) / MIB


async def bench(reads: int, folder: Path) -> None:
    with serve_api() as (url, state):
        state.files["/big.bin"] = os.urandom(MIB)
        policy = folder / "policy.toml"
        policy.write_text(f"[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/remote'\n"
                          f"base_url = '{url}/v1'\n")
        journal_path = default_journal_path()
        with Journal(journal_path) as journal:
            async with open_run(load_policy(policy), journal=journal) as run:
                journal_before = journal_mib(journal_path)
                await run.cell("data = open('/remote/big.bin', 'rb').read()")
                rss_before = rss_mib()  # after the first read (and the session image it may cause)
                started = time.perf_counter()
                result = await run.cell(f"for _ in range({reads}):\n    open('/remote/big.bin', 'rb').read()")
                seconds = time.perf_counter() - started
                rss_after = rss_mib()
            journal_after = journal_mib(journal_path)
        requests = sum(1 for method, _, _ in state.log if method == "GET")
    print(f"{reads} reads of one cached 1 MiB file in one cell ({result.status}, {seconds:.2f} s, "
          f"{requests} request(s) sent)")
    print(f"  host RSS growth   {rss_after - rss_before:8.1f} MiB   (floor: 0; target < 20; with session "
          "images on this includes the image a long cell leaves, one copy of the guest's memory: "
          "UBERTOOL_IMAGES_SELFTEST=fail measures the reads alone)")
    print(f"  journal growth    {journal_after - journal_before:8.1f} MiB   (floor: the file once, 1.0; "
          "target < 20)")


async def quota_bench(folder: Path) -> None:
    """A cell writing 1 GiB in 1 MiB chunks under a 100 MiB quota: when it is stopped, and how
    far past the quota it got (what it had written, read back from its own counter)."""
    policy = folder / "quota.toml"
    policy.write_text("[workspace]\nquota_mib = 100\n")
    async with open_run(load_policy(policy)) as run:
        started = time.perf_counter()
        code = ("written = 0\nf = open('/workspace/big.bin', 'wb')\nchunk = b'x' * 2**20\n"
                "for _ in range(1024):\n    f.write(chunk)\n    f.flush()\n    written += 2**20")
        result = await run.cell(code, timeout_s=120)
        seconds = time.perf_counter() - started
        written = (await run.cell("written")).value
    over = (int(str(written)) - 100 * MIB) / MIB if written is not None else float("nan")
    print(f"1 GiB written under a 100 MiB quota ({result.status})")
    print(f"  stopped after    {seconds:8.2f} s")
    print(f"  overshoot        {over:8.1f} MiB   (target: at most 10 MiB, 10% of the quota; "
          "nan: the stop was a rollback)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    print(f"ubertool host-bounds benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UBERTOOL_HOME", str(Path(tmp) / "home"))
        anyio.run(bench, args.reads, Path(tmp))
        anyio.run(quota_bench, Path(tmp))


if __name__ == "__main__":
    main()
