"""Sessions on a Ray cluster, measured on this machine: a two-node cluster on loopback.

- allocation: a new session taken from the warm pool through the cluster (the directory's
  `take` and finding the actor by name: what a front end does before the first cell);
- round trip: one trivial cell through the seam (`Sessions.call`), cluster vs in-process;
- memory: what one session costs on the host, as a Ray actor (its process's PSS and RSS) and
  in-process (the server's growth per session), against a process per session (as a container
  per session would need: measured as a plain Python process holding one session, plus a
  container runtime's shim, which is estimated, not measured);
- restore after node loss: sessions of 20 and 100 cells on the worker node, saved when they
  rest (`[sessions] persist_idle_s = 1`), the worker killed (SIGKILL, as in tests/test_cluster.py),
  each session's next call answered `[restored]` on the head node: from its saved image, against
  the same kind of session whose saved state was deleted before the kill (restored by replaying
  its cells from the journal, as without `[sessions] persist`). The front end's wall time of that
  call, and the restore's own `seconds` as its report says. Each restore finds the head's warm
  pool full (waited for, untimed): a warm actor takes the session up. A new worker node per
  repetition.

The bench process is the front end (`RaySessions`): it calls `ray.init` before it opens its own
sandboxes (the in-process figures), as it must (see `ubertool.runtime.cluster.RaySessions._connect`).
It ends the Ray processes it started by their process groups (not `ray stop`, which would end
every Ray on the machine).

Writes bench/results/cluster.md and rows of the bench table (bench/table.py).
Run: .venv/bin/python bench/cluster.py
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))
from table import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_nodes import kill_group, start_ray

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
MIB = 2**20
# Sessions are saved once they rest a second (the default is 30 s): what a lost node's restore uses.
POLICY = "[limits]\nmemory_mib = 64\n[sessions]\npersist_idle_s = 1\n"
# The head has less memory than the worker, so placement by memory puts sessions on the worker
# (the node killed); the head keeps room for the warm pool and the restored sessions.
HEAD_MEMORY, WORKER_MEMORY = 3072 * MIB, 8192 * MIB
RESTORE_CELLS = (20, 100)
RESTORE_REPEATS = 3  # each kills a node and starts a new one: costly
# Targets, against the replay: the restore itself from an image does not grow with cells as a
# replay does (at 100 cells, a quarter of the replay's at most; at 20, no slower); at the front
# end, where a warm actor takes the session up, half the replay's at 100 cells, and at 20 no
# slower (within this shared machine's noise, 20%).
RESTORE_RATIO = {20: 1.0, 100: 0.25}
RESTORE_WALL_RATIO = {20: 1.2, 100: 0.5}
COMMON = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
MODULES = ["json", "re", "statistics", "hashlib", "decimal", "fractions", "textwrap", "difflib", "csv",
           "heapq"]
SHIM_MIB = 10  # a container runtime's per-container shim (containerd-shim-runc-v2), about; not measured
ONE_SESSION = """
import anyio, os
from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run
async def main():
    async with open_run(load_policy(os.environ["POLICY"])) as run:
        await run.cell("x = list(range(1000))")
        print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0], flush=True)
anyio.run(main)
"""


def ray(*args: str, env: dict[str, str]) -> int:
    """`ray ARGS` in a process group of its own; the group's id."""
    return start_ray(BIN / "ray", *args, env=env)


@dataclass
class Nodes:
    """The bench's Ray nodes on loopback: the process groups of the head and of each worker
    started (the last one is the live worker)."""

    address: str
    env: dict[str, str]
    groups: list[int]

    def start_worker(self) -> None:
        self.groups.append(ray("start", "--address", self.address, "--memory", str(WORKER_MEMORY), *COMMON,
                               env=self.env))

    def kill_worker(self) -> None:
        kill_group(self.groups[-1])

    def stop(self) -> None:
        for group in reversed(self.groups):
            kill_group(group)


def restore_cells(n: int) -> list[str]:
    """`n` cells of a session with state: every tenth imports a module, each builds rows, their
    JSON text and a sorted top five; the last one sums up the state (its value checks a restore)."""
    cells = []
    for i in range(n - 1):
        imports = f"import json, {MODULES[i // 10 % len(MODULES)]}\n" if i % 10 == 0 else ""
        cells.append(f"{imports}rows_{i} = [{{'id': k, 'name': f'item-{{k}}', 'score': (k * {i + 7}) % 101}} "
                     f"for k in range(500)]\nblob_{i} = json.dumps(rows_{i})\n"
                     f"top_{i} = sorted(rows_{i}, key=lambda r: (-r['score'], r['id']))[:5]")
    cells.append(f"sum(len(globals()[f'blob_{{i}}']) + globals()[f'top_{{i}}'][0]['id'] "
                 f"for i in range({n - 1}))")
    return cells


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process, KiB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    fields = dict(line.split(":", 1) for line in rollup)
    return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])


def session_processes() -> list[int]:
    """The session actors' processes (warm and claimed) on this machine."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::SessionHost" in line]


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms (min {min(samples) * 1000:.1f}, n={len(samples)})"


async def full_pool(directory: Any, nodes: int) -> None:
    """Until the directory keeps two warm sessions on each of `nodes` nodes (120 s at most)."""
    deadline = time.monotonic() + 120
    while sorted((await directory.pool.remote()).values(), reverse=True)[:nodes] != [2] * nodes:
        assert time.monotonic() < deadline, "the warm pool did not fill"
        await anyio.sleep(0.2)


def saved_through(home: Path, handle: str) -> int:
    """The last cell session `handle`'s saved image reflects (0 when it has no save yet)."""
    path = home / "sessions" / f"{handle}.json"
    if not path.exists():
        return 0
    return json.loads(json.loads(path.read_text())["record"])["through"]


async def restores(sessions: Any, nodes: Nodes, home: Path) -> list[str]:
    """Restore after node loss (see the module's docstring), RESTORE_REPEATS times; the lines of
    the report, and rows of the bench table."""
    import ray as ray_api

    directory = sessions._directory
    walls: dict[tuple[int, bool], list[float]] = {}
    seconds: dict[tuple[int, bool], list[float]] = {}
    for repeat in range(RESTORE_REPEATS):
        if repeat:
            await anyio.to_thread.run_sync(nodes.start_worker)
        principal = f"restore-{repeat}"
        made = []  # (cells, from its image, handle, the last cell's value)
        for n in RESTORE_CELLS:
            cells = restore_cells(n)
            for image in (True, False):
                await full_pool(directory, 2)  # a warm one on the worker: the roomier node takes it
                first = await sessions.call(None, None, principal, cells[0], timeout_s=None, traceparent=None)
                handle = first.structured_content["session"]
                for code in cells[1:]:
                    result = await sessions.call(handle, None, principal, code, timeout_s=None,
                                                 traceparent=None)
                    assert result.structured_content["status"] == "ok", result.structured_content
                made.append((n, image, handle, result.structured_content["value"]))
        where = {await ray_api.get_actor(h, namespace="ubertool").where.remote() for _, _, h, _ in made}
        head = ray_api.get_runtime_context().get_node_id()
        assert len(where) == 1 and head not in where, f"sessions not all on the worker: {where}"
        deadline = time.monotonic() + 60
        for n, image, handle, _ in made:
            while saved_through(home, handle) < n:
                assert time.monotonic() < deadline, f"session {handle} was not saved through cell {n}"
                await anyio.sleep(0.2)
            if not image:  # its saved state absent: restored by replay, as without `[sessions] persist`
                for suffix in (".json", ".image", ".files"):
                    (home / "sessions" / f"{handle}{suffix}").unlink(missing_ok=True)
        nodes.kill_worker()
        # Not timed: Ray's own detection (its default, about 15 s; a faster one marks a busy
        # head dead on this shared machine).
        deadline = time.monotonic() + 90
        while any(n["NodeID"] in where and n["Alive"] for n in await anyio.to_thread.run_sync(ray_api.nodes)):
            assert time.monotonic() < deadline, "Ray did not notice the lost node"
            await anyio.sleep(0.1)
        for n, image, handle, value in made[::1 if repeat % 2 else -1]:  # either path first, in turn
            await full_pool(directory, 1)  # the head's, refilled since the last restore took one
            started = time.perf_counter()
            lost = await sessions.call(handle, None, principal, "1", timeout_s=None, traceparent=None)
            wall = time.perf_counter() - started
            answer = lost.structured_content
            report = answer["restored"]
            assert "[restored]" in answer["message"] and report["ok"] and report["image"] == image, answer
            walls.setdefault((n, image), []).append(wall)
            seconds.setdefault((n, image), []).append(report["seconds"])
            again = await sessions.call(handle, None, principal, restore_cells(n)[-1], timeout_s=None,
                                        traceparent=None)
            assert again.structured_content["value"] == value, (again.structured_content, value)
            name = await directory.actor_name.remote(handle)  # a warm actor's: not the handle
            await ray_api.get_actor(name, namespace="ubertool").close.remote("bench: measured")
            await directory.closed.remote(handle)
    rest = {image: statistics.median(wall - own for (_, i), ws in walls.items() if i == image
                                     for wall, own in zip(ws, seconds[_, i], strict=True))
            for image in (True, False)}
    lines = [f"- restore after node loss (median of {RESTORE_REPEATS} node kills, 4 sessions restored after "
             "each): the call answered `[restored]`, at the front end, and the restore itself (its report's "
             f"`seconds`). The rest, {rest[True]:.1f} s from an image and {rest[False]:.1f} s by replay, "
             "is a warm actor on the head taking the session up (closing its own run, opening the "
             "session's: loading the saved state) and the calls to the directory and the actor"]
    floor = "the same session by replay (saved state deleted)"
    for n in RESTORE_CELLS:
        wall_image, wall_replay = (statistics.median(walls[n, image]) for image in (True, False))
        own_image, own_replay = (statistics.median(seconds[n, image]) for image in (True, False))
        lines.append(
            f"  - {n} cells: from its saved image {wall_image:.2f} s (min {min(walls[n, True]):.2f}; the "
            f"restore itself {own_image:.2f} s), by replay {wall_replay:.2f} s "
            f"(min {min(walls[n, False]):.2f}; {own_replay:.2f} s): {wall_image / wall_replay:.2f}x the "
            f"replay at the front end, {own_image / own_replay:.2f}x the replay itself")
        record(f"lost node, {n} cells, from image (wall)", wall_image * 1000, wall_replay * 1000, floor,
               ratio=RESTORE_WALL_RATIO[n])
        record(f"lost node, {n} cells, the restore itself", own_image * 1000, own_replay * 1000, floor,
               ratio=RESTORE_RATIO[n])
    return lines


async def measure(address: str, policy_path: Path, nodes: Nodes, home: Path) -> list[str]:
    import ray as ray_api

    from ubertool.runtime.cluster import Cluster, RaySessions
    from ubertool.runtime.journal import Journal
    from ubertool.runtime.policy import load_policy
    from ubertool.runtime.sessions import SessionManager

    policy = load_policy(policy_path)
    lines = []
    async with RaySessions(policy, Cluster(address, warm=2)).running() as sessions:
        directory = sessions._directory
        takes = []
        for _ in range(6):
            deadline = time.monotonic() + 120
            while sum((await directory.pool.remote()).values()) < 4:  # both nodes' pools full
                assert time.monotonic() < deadline, "the warm pool did not fill"
                await anyio.sleep(0.2)
            started = time.perf_counter()
            handle = await directory.take.remote("bench")
            ray_api.get_actor(handle, namespace="ubertool")
            takes.append(time.perf_counter() - started)
        lines.append(f"- allocation from the warm pool through the cluster: {median_ms(takes)}")

        cluster_trips = []
        await sessions.call(handle, None, "bench", "1", timeout_s=None, traceparent=None)
        for _ in range(50):
            started = time.perf_counter()
            await sessions.call(handle, None, "bench", "1", timeout_s=None, traceparent=None)
            cluster_trips.append(time.perf_counter() - started)
        actors = [memory_kib(pid) for pid in session_processes()]
        pss, rss = statistics.median(p for p, _ in actors), statistics.median(r for _, r in actors)
        restored = await restores(sessions, nodes, home)
    with Journal.default(policy.journal) as journal:
        manager = SessionManager(policy, journal=journal)
        async with manager.running():
            local_trips = []
            before = memory_kib(os.getpid())[1]
            handles = []
            for _ in range(4):
                async with manager.use(None, None, "bench") as (h, _run):
                    handles.append(h)
                await manager.call(handles[-1], None, "bench", "x = list(range(1000))",
                                   timeout_s=None, traceparent=None)
            per_local = (memory_kib(os.getpid())[1] - before) / 4
            for _ in range(50):
                started = time.perf_counter()
                await manager.call(handles[0], None, "bench", "1", timeout_s=None, traceparent=None)
                local_trips.append(time.perf_counter() - started)
    lines.append("- round trip of the cell `1` through the cluster (`RaySessions.call`): "
                 f"{median_ms(cluster_trips)}")
    lines.append(f"- the same in-process (`SessionManager.call`): {median_ms(local_trips)}")
    env = {**os.environ, "POLICY": str(policy_path)}
    alone = int(subprocess.run([sys.executable, "-c", ONE_SESSION], env=env, capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    lines += [
        f"- one session as a Ray actor (median of {len(actors)} actor processes): PSS {pss / 1024:.0f} MiB, "
        f"RSS {rss / 1024:.0f} MiB "
        f"(about {1024 / (pss / 1024):.1f} sessions per GiB, by PSS)",
        f"- one session in-process: the server grew {per_local / 1024:.0f} MiB per session "
        f"(about {1024 / max(per_local / 1024, 1):.0f} sessions per GiB)",
        f"- a process per session (a container's payload): RSS {alone / 1024:.0f} MiB, plus a shim of "
        f"~{SHIM_MIB} MiB (estimated): about {1024 / (alone / 1024 + SHIM_MIB):.1f} sessions per GiB",
        *restored,
    ]
    return lines


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="ubb-"))  # short: Ray's socket paths must fit 107 bytes
    policy = scratch / "policy.toml"
    policy.write_text(POLICY)
    home = scratch / "home"
    home.mkdir()
    os.environ.update(UBERTOOL_HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    port = 6400 + os.getpid() % 1000
    nodes = Nodes(f"127.0.0.1:{port}", env, [])
    try:
        nodes.groups.append(ray("start", "--head", "--port", str(port), "--include-dashboard=false",
                                "--temp-dir", str(scratch / "r"), "--memory", str(HEAD_MEMORY), *COMMON,
                                env=env))
        nodes.start_worker()
        lines = anyio.run(measure, nodes.address, policy, nodes, home)
    finally:
        nodes.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report = "\n".join(["# Sessions on a Ray cluster (bench/cluster.py)", "",
                        f"Two Ray nodes on one machine ({os.cpu_count()} cores), policy `memory_mib = 64`, "
                        "`persist_idle_s = 1`.",
                        "",
                        *lines, ""])
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "cluster.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
