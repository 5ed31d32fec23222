"""Playbook benchmark: a 20-cell session through MCP over stdio, then its playbook replayed.

The session's wall time is measured at the client (each call waits for its answer, as an agent
does, but with no thinking time: the agent's real time is far longer). The replay is timed as a
person runs it, `ubertool replay` from process start, beside the same cells run in one process.

    .venv/bin/python bench/playbooks.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

sys.path.insert(0, str(Path(__file__).parent))
from table import record

UBERTOOL = str(Path(sys.executable).with_name("ubertool"))
CELLS = ["import numpy as np\nimport pandas as pd", "n = 2000"] + [
    f"frame_{i} = pd.DataFrame({{'x': np.arange(n) * {i}, 'y': np.arange(n) % 7}})\n"
    f"stat_{i} = frame_{i}.groupby('y').x.sum().max()" for i in range(17)
] + ["print(sum(globals()[f'stat_{i}'] for i in range(17)))"]


async def session(env: dict[str, str]) -> tuple[float, float]:
    """The session's wall time at the client, and its cells' own run time (as each result says)."""
    started = time.perf_counter()
    own = 0.0
    async with Client(StdioTransport(UBERTOOL, ["serve"], env=env)) as client:
        for code in CELLS:
            own += (await client.call_tool("python", {"code": code})).structured_content["duration_s"]
        saved = await client.call_tool("python", {"code": "import ubertool\n"
                                                  "ubertool.save_playbook('bench20', params={'n': 2000})"})
        assert not saved.is_error, saved
    return time.perf_counter() - started, own


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "UBERTOOL_HOME": home}
        wall, own = anyio.run(session, env)
        playbook = Path(home) / "playbooks" / "bench20.py"
        replays = []
        for _ in range(3):
            started = time.perf_counter()
            done = subprocess.run([UBERTOOL, "replay", str(playbook)], env=env, capture_output=True,
                                  text=True)
            assert done.returncode == 0, done.stderr
            replays.append(time.perf_counter() - started)
        replay = sorted(replays)[1]
    print(f"ubertool playbook benchmark, {time.strftime('%Y-%m-%d %H:%M')}: {len(CELLS)} cells")
    print(f"  session through MCP over stdio (no agent thinking time) {wall:7.2f} s")
    print(f"  `ubertool replay` from process start, median of 3       {replay:7.2f} s"
          f"   speedup {wall / replay:5.2f}x")
    print(f"  the cells' own run time in that session                   {own:7.2f} s")
    record("replay of a 20-cell playbook", replay * 1000, own * 1000,
           "the cells' own run time (in the MCP session)", ratio=1.2, slack=300)


if __name__ == "__main__":
    main()
