"""Sessions on a Ray cluster, measured on this machine: a two-node cluster on loopback.

- allocation: a new session taken from the warm pool through the cluster (the directory's
  `take` and finding the actor by name: what a front end does before the first cell);
- round trip: one trivial cell through the seam (`Sessions.call`), cluster vs in-process;
- memory: what one session costs on the host, as a Ray actor (its process's PSS and RSS) and
  in-process (the server's growth per session), against a process per session (as a container
  per session would need: measured as a plain Python process holding one session, plus a
  container runtime's shim, which is estimated, not measured).

Writes bench/results/cluster.md. Run: .venv/bin/python bench/cluster.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
MIB = 2**20
POLICY = "[limits]\nmemory_mib = 64\n"
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


def ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "ray"), *args], env=env, check=True, capture_output=True, timeout=180)


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


async def measure(address: str, policy_path: Path) -> list[str]:
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
    ]
    return lines


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="ubb-"))
    policy = scratch / "policy.toml"
    policy.write_text(POLICY)
    home = scratch / "home"
    home.mkdir()
    os.environ.update(UBERTOOL_HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    port = 6400 + os.getpid() % 1000
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(4096 * MIB),
              "--disable-usage-stats"]
    try:
        ray("start", "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir",
            str(scratch / "r"), *common, env=env)
        ray("start", "--address", f"127.0.0.1:{port}", *common, env=env)
        lines = anyio.run(measure, f"127.0.0.1:{port}", policy)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(scratch, ignore_errors=True)
    report = "\n".join(["# Sessions on a Ray cluster (bench/cluster.py)", "",
                        f"Two Ray nodes on one machine ({os.cpu_count()} cores), policy `memory_mib = 64`.",
                        "",
                        *lines, ""])
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "cluster.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
