"""Sessions on a Ray cluster: a two-node cluster on loopback (`ray start --head` and a second
`ray start --address`) with its journal and saved sessions in PostgreSQL (as across machines),
two `ubertool serve --cluster` front ends over HTTP serving one session
alternately through fastmcp's Client, a cell cancelled through the cluster, the worker node
killed mid-session and its sessions resumed on the head node: one from its saved image and
folders, one by replay (its saved folders tampered with)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import VENV_BIN, cli_env, ubertool_command
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from postgres import Postgres
from ray_nodes import kill_group, start_ray
from servers import free_port, start_http_server

from ubertool.runtime.journal import Journal
from ubertool.runtime.stores import PostgresStore

# Token authentication on, as a real cluster should run: the nodes, the front ends and this test's
# driver hold one token. Ray reads these when it is imported: hence here, before.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
pytest.importorskip("ray")  # never initialised in this process: see ray_driver.py

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MIB = 2**20
# Sessions are saved once they rest a second (the default is 30 s): what a lost node's restore uses.
# A principal holds at most CAP sessions across the cluster.
CAP = 3
POLICY = (f"[limits]\nmemory_mib = 64\ntimeout_s = 30\n[sessions]\npersist_idle_s = 1\n"
          f"[server]\nmax_sessions_per_principal = {CAP}\n")
# The head has less memory than the worker, so placement by memory puts the first session on
# the worker, the node the test kills; the head keeps room for the restored one.
HEAD_MEMORY, WORKER_MEMORY = 1536 * MIB, 4096 * MIB
# Ray notices a lost node within about 1.5 s instead of its default of about 15 s.
FAST_DETECTION = ('{"health_check_period_ms":500,"health_check_failure_threshold":3,'
                  '"health_check_initial_delay_ms":0}')


@dataclass
class RayCluster:
    address: str
    home: Path
    policy: Path
    worker: int  # the worker node's process group (see ray_nodes)
    env: dict[str, str]
    journal_url: str

    def journal(self) -> Journal:
        return Journal(PostgresStore(self.journal_url))

    def kill_worker(self) -> None:
        """The worker node dies: its raylet and every process it started (SIGKILL), the actors'
        worker processes included."""
        kill_group(self.worker)


def _ray(*args: str, env: dict[str, str]) -> int:
    return start_ray(VENV_BIN / "ray", *args, env=env)


@pytest.fixture(scope="module")
def cluster(postgres: Postgres) -> Iterator[RayCluster]:
    """Two Ray nodes on 127.0.0.1 with one CPU each, in temporary folders, a fresh PostgreSQL
    database for the journal; stopped (--force)."""
    scratch = Path(tempfile.mkdtemp(prefix="ubc-"))  # short: Ray's socket paths must fit 107 bytes
    home = scratch / "home"
    home.mkdir()
    policy = scratch / "policy.toml"
    url = postgres.url(postgres.new_database())
    policy.write_text(f'{POLICY}[journal]\nurl = "{url}"\n')
    env = cli_env(UBERTOOL_HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    groups = []
    try:
        groups.append(_ray("start", "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir",
                           str(scratch / "ray"), "--memory", str(HEAD_MEMORY),
                           f"--system-config={FAST_DETECTION}", *common, env=env))
        groups.append(_ray("start", "--address", f"127.0.0.1:{port}", "--memory", str(WORKER_MEMORY),
                           *common, env=env))
        yield RayCluster(f"127.0.0.1:{port}", home, policy, groups[1], env, url)
    finally:
        for group in reversed(groups):  # this cluster's processes only: not `ray stop`
            kill_group(group)
        shutil.rmtree(scratch, ignore_errors=True)


class Driver:
    """Asks the cluster (where an actor runs, the warm pool, a direct actor call) through
    `ray_driver.py`, a Ray driver in its own process: see there why not in this one."""

    def __init__(self, cluster: RayCluster) -> None:
        script = Path(__file__).with_name("ray_driver.py")
        self.proc = subprocess.Popen([str(VENV_BIN / "python"), str(script), cluster.address],
                                     env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def ask(self, name: str, *args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([name, args]) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def node_ids(self) -> tuple[str, str]:
        """(head, worker) node ids."""
        by_memory = {memory: node for node, memory in self.ask("nodes").items()}
        return by_memory[HEAD_MEMORY], by_memory[WORKER_MEMORY]

    def wait_for_warm_pool(self, nodes: int) -> None:
        """Until the directory keeps a warm session on each of `nodes` nodes (60 s at most)."""
        deadline = time.monotonic() + 60
        while sum(1 for n in self.ask("pool").values() if n) < nodes:
            assert time.monotonic() < deadline, "the warm pool did not fill"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def driver(cluster: RayCluster) -> Iterator[Driver]:
    driver = Driver(cluster)
    yield driver
    driver.proc.stdin.close()  # type: ignore[union-attr]
    driver.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def front_ends(cluster: RayCluster) -> Iterator[list[str]]:
    """Two `ubertool serve --cluster` processes over HTTP; their /mcp URLs."""
    started = []
    try:
        for _ in range(2):
            proc, url = start_http_server(ubertool_command(), cluster.env,
                                          ["--policy", str(cluster.policy), "--cluster", cluster.address,
                                           "--warm-pool", "1"])
            started.append((proc, url))
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            proc.terminate()
            proc.wait(timeout=60)


async def call(client: Client, code: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool("python", {"code": code, **args}, raise_on_error=False)
    return result.structured_content


async def test_two_front_ends_serve_one_session_and_a_cancel_stops_its_cell(
        front_ends: list[str], driver: Driver) -> None:
    driver.wait_for_warm_pool(2)
    async with Client(front_ends[0], timeout=120) as a, Client(front_ends[1], timeout=120) as b:
        first = await call(a, "x = 1\nx")
        handle = first["session"]
        assert first["value"] == "1"
        assert (await call(b, "x += 1\nx", session=handle))["value"] == "2"
        assert (await call(a, "x += 1\nx", session=handle))["value"] == "3"
        assert driver.ask("where", handle) == driver.node_ids()[1]  # placed by memory: the roomier worker

        with anyio.move_on_after(2):
            await call(b, "while True: pass", session=handle, timeout_s=60)
        with anyio.fail_after(20):  # had the loop not been stopped in the actor, this waits 60 s
            after = await call(a, "x", session=handle)
        assert after["value"] == "3"


async def test_the_actor_refuses_another_principal(front_ends: list[str], driver: Driver) -> None:
    async with Client(front_ends[0], timeout=120) as a:
        handle = (await call(a, "secret = 42"))["session"]
    assert "no open session" in driver.ask("call_as", handle, "mallory", "secret")["error"]
    async with Client(front_ends[1], timeout=120) as b:
        assert (await call(b, "secret", session=handle))["value"] == "42"


async def test_a_stdio_front_end_keeps_its_connection_s_session(cluster: RayCluster) -> None:
    transport = StdioTransport(ubertool_command(), ["serve", "--policy", str(cluster.policy), "--cluster",
                                                    cluster.address, "--warm-pool", "1"], env=cluster.env)
    async with Client(transport, timeout=120) as client:
        first = await call(client, "y = 'stdio'")
        second = await call(client, "y")  # no `session`: the connection's own
    assert second["value"] == "'stdio'" and second["session"] == first["session"]


async def test_a_principal_at_its_cap_gives_up_its_longest_idle_session(
        cluster: RayCluster, front_ends: list[str]) -> None:
    async with Client(front_ends[0], timeout=120) as client:
        handles = [(await call(client, f"n = {n}"))["session"] for n in range(CAP)]  # each a new one
        saved_folders(cluster, handles[0])
        handles.append((await call(client, f"n = {CAP}"))["session"])
        gone = await call(client, "n", session=handles[0])
        assert "no open session" in gone["message"], gone
        with cluster.journal() as journal:  # what it saved went with it
            assert journal.get_image(f"{handles[0]}.json") is None
        for n, handle in enumerate(handles[1:], 1):  # the cluster-wide count: over both nodes
            assert (await call(client, "n", session=handle))["value"] == str(n)


def saved_folders(cluster: RayCluster, handle: str) -> bytes:
    """The saved folders of session `handle` (sealed), once its actor has saved them (30 s at
    most): in the journal's database, where every node finds them."""
    deadline = time.monotonic() + 30
    with cluster.journal() as journal:
        while (saved := journal.get_image(f"{handle}.files")) is None:
            assert time.monotonic() < deadline, f"session {handle} was not saved"
            time.sleep(0.2)
    return saved.data


async def test_a_lost_node_s_sessions_resume_on_the_other_from_their_images_or_by_replay(
        cluster: RayCluster, front_ends: list[str], driver: Driver) -> None:
    head, worker = driver.node_ids()
    driver.wait_for_warm_pool(2)
    ticks: list[float] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        ticks.append(value)

    async with Client(front_ends[0], timeout=120) as a, \
            Client(front_ends[1], timeout=120, progress_handler=progress) as b:
        setup = ("import random\ndata = [1, 2]\nopen('/workspace/notes.txt', 'w').write('k')\n"
                 "f = open('/tmp/held', 'w+'); f.write('abc'); f.flush()\nr = random.random()\nr")
        first = await call(a, setup)
        handle, r = first["session"], first["value"]
        driver.wait_for_warm_pool(2)  # the worker's taken again: the next session goes there too
        other = await call(b, "import random\nopen('/workspace/b.txt', 'w').write('b')\nq = random.random()")
        assert driver.ask("where", handle) == driver.ask("where", other["session"]) == worker
        saved_folders(cluster, handle)
        sealed = bytearray(saved_folders(cluster, other["session"]))
        sealed[len(sealed) // 2] ^= 1
        with cluster.journal() as journal:  # whoever can write the database cannot forge a session
            journal.put_image(f"{other['session']}.files", bytes(sealed), {})
        await call(b, "data.append(3)", session=handle)  # after its save: replayed from the journal

        async def kill_mid_cell() -> None:
            while not ticks:  # the cell runs on the worker: its progress reached the client
                await anyio.sleep(0.1)
            cluster.kill_worker()

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_mid_cell)
            with anyio.fail_after(60):
                lost = await call(b, "import time\ndata.append('never')\ntime.sleep(30)", session=handle)
        assert lost["status"] == "cancelled" and "[restored]" in lost["message"], lost
        report = lost["restored"]
        assert lost["node"] == head and report["ok"] and report["image"], lost
        assert report["through"] + report["cells"] == 2, report  # the cells after its save replayed
        assert "from its image saved after cell" in lost["message"]

        again = await call(a, "data.append(4)\n(data, open('/workspace/notes.txt').read(), r, f.tell())",
                           session=handle)
        assert again["value"] == f"([1, 2, 3, 4], 'k', {r}, 3)", again  # r: the image's, not a replay's
        assert driver.ask("where", handle) == head

        replayed = await call(b, "q", session=other["session"])
        assert "[restored]" in replayed["message"] and not replayed["restored"]["image"], replayed
        assert "the saved files was refused: its MAC does not match" in replayed["message"]
        after = await call(b, "q, open('/workspace/b.txt').read()", session=other["session"])
        assert after["value"].endswith(", 'b')"), after  # its file written again by the replay

    with cluster.journal() as journal:  # the restored run holds every cell
        run = journal.find_run(handle)
        assert run is not None and [c.code.splitlines()[0] for c in journal.cells(run.id)] == [
            "import random", "data.append(3)", "data.append(4)"]
