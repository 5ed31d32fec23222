"""What a guest can make the host hold: a 1 MiB mount file read once, then 200 times in one cell.

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
                await run.cell("pass")
                rss_before = rss_mib()
                journal_before = journal_mib(journal_path)
                await run.cell("data = open('/remote/big.bin', 'rb').read()")
                started = time.perf_counter()
                result = await run.cell(f"for _ in range({reads}):\n    open('/remote/big.bin', 'rb').read()")
                seconds = time.perf_counter() - started
                rss_after = rss_mib()
            journal_after = journal_mib(journal_path)
        requests = sum(1 for method, _, _ in state.log if method == "GET")
    print(f"{reads} reads of one cached 1 MiB file in one cell ({result.status}, {seconds:.2f} s, "
          f"{requests} request(s) sent)")
    print(f"  host RSS growth   {rss_after - rss_before:8.1f} MiB   (floor: 0; target < 20)")
    print(f"  journal growth    {journal_after - journal_before:8.1f} MiB   (floor: the file once, 1.0; "
          "target < 20)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    print(f"ubertool host-bounds benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UBERTOOL_HOME", str(Path(tmp) / "home"))
        anyio.run(bench, args.reads, Path(tmp))


if __name__ == "__main__":
    main()
