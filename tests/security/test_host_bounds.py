"""What a guest can make the host hold stays bounded: reads of a mount are sent and recorded once
per run, bodies are kept once (in the journal as content-addressed BLOBs, in the run's one spool
file), and the journal is pruned."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import JournalBackend, cli_env, ubertool_command
from fakeapi import ApiState, serve_api

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run
from ubertool.sandbox import Status
from ubertool.sandbox.quota import used_bytes
from ubertool.tools.recorder import Spool

pytestmark = pytest.mark.anyio
MIB = 2**20


@pytest.fixture
def api() -> Iterator[tuple[str, ApiState]]:
    with serve_api() as (url, state):
        state.files["/big.bin"] = bytes(range(256)) * (MIB // 256)
        state.files["/note.txt"] = b"v1"
        yield url, state


def policy(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(f"[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\nbase_url = '{url}/v1'\n"
                    "writable = true\nmethods = ['GET', 'PUT']\nallow_private = true\n")
    return path


def gets(state: ApiState, path: str) -> int:
    return sum(1 for method, p, _ in state.log if method == "GET" and p.endswith(path))


def ubertool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ubertool_command(), *args], capture_output=True, text=True, timeout=300,
                          env=cli_env())


async def test_repeated_reads_are_sent_recorded_and_journaled_once(api: tuple[str, ApiState],
                                                                   tmp_path: Path) -> None:
    url, state = api
    journal_path = default_journal_path()
    with Journal(journal_path) as journal:
        async with open_run(load_policy(policy(tmp_path, url)), journal=journal) as run:
            first = await run.cell("data = open('/api/big.bin', 'rb').read()\nlen(data)")
            many = await run.cell("all(open('/api/big.bin', 'rb').read() == data for _ in range(200))")
            assert (first.status, many.status, str(many.value)) == (Status.OK, Status.OK, "True"), many
            run_id = run.id
            spool = run.workspace.parent / "bodies"
            assert [p.stat().st_size for p in spool.iterdir()] == [MIB]  # one file, on disk
        assert gets(state, "/big.bin") == 1
        assert (len(first.exchanges), len(many.exchanges)) == (1, 0)
        db = sqlite3.connect(journal_path)
        assert db.execute("SELECT COUNT(*), SUM(LENGTH(data)) FROM bodies").fetchone() == (1, MIB)
        assert max(len(row[0]) for row in db.execute("SELECT exchanges FROM cells")) < 1000  # no base64
        assert journal.cells(run_id)[0].exchanges[0].response["body"] == state.files["/big.bin"]
    assert journal_path.stat().st_size < 3 * MIB
    assert not spool.exists()  # removed with the run


def test_the_spool_keeps_each_content_once_and_drops_an_unfinished_body(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "bodies")
    first = spool.put(b"a" * 1000)
    with pytest.raises(RuntimeError), spool.writer() as dropped:  # e.g. over max_bytes mid-stream
        dropped.write(b"b" * 5000)
        raise RuntimeError
    second = spool.put(b"c" * 10)
    again = spool.put(b"a" * 1000)
    assert again == first and again.offset == first.offset
    assert (first.read(), second.read()) == (b"a" * 1000, b"c" * 10)
    assert [p.stat().st_size for p in spool.folder.iterdir()] == [1010]
    with pytest.raises((OSError, ValueError)), spool.writer() as late:  # a cell stopped mid-fetch
        late.write(b"d" * 10)
        spool.close()  # does not wait for the writer
        late.write(b"d" * 10)
        late.done()
    assert not spool.folder.exists()


async def test_a_write_makes_the_next_read_ask_again_and_restore_sees_each_version(
        api: tuple[str, ApiState], tmp_path: Path) -> None:
    url, state = api
    async with open_run(load_policy(policy(tmp_path, url))) as run:
        assert (await run.cell("before = open('/api/note.txt').read()")).status is Status.OK
        assert (await run.cell("open('/api/note.txt', 'w').write('v2')\n"
                               "after = open('/api/note.txt').read()\nagain = open('/api/note.txt').read()")
                ).status is Status.OK
        timed_out = await run.cell("import time\ntime.sleep(100)", timeout_s=1)  # a hard stop
        assert timed_out.status is Status.TIMEOUT and timed_out.restored.ok, timed_out.restored
        assert str((await run.cell("before, after, again")).value) == "('v1', 'v2', 'v2')"
    assert gets(state, "/note.txt") == 2  # once before the write, once after; none by the restore


async def test_an_offline_replay_finds_reads_made_by_cells_left_out(api: tuple[str, ApiState],
                                                                    tmp_path: Path) -> None:
    url, state = api
    with Journal(default_journal_path()) as journal:
        async with open_run(load_policy(policy(tmp_path, url)), journal=journal) as run:
            failed = await run.cell("text = open('/api/note.txt').read()\n1 / 0")
            assert failed.status is Status.ERROR
            await run.cell("print(open('/api/note.txt').read().upper())")  # answered from the run
            run_id = run.id
    out = tmp_path / "book.py"
    assert ubertool("sessions", "dump", run_id, "-o", str(out)).returncode == 0
    del state.files["/note.txt"]
    offline = ubertool("replay", str(out), "--offline")
    assert (offline.returncode, offline.stdout) == (0, "V1\n"), offline.stderr


async def test_prune_removes_old_runs_and_their_bodies_never_playbooks(
        api: tuple[str, ApiState], tmp_path: Path, journal_backend: JournalBackend) -> None:
    url, _ = api
    path = policy(tmp_path, url)
    path.write_text(path.read_text() + journal_backend.toml())
    with Journal(journal_backend.store()) as journal:
        async with open_run(load_policy(path), journal=journal) as old:
            await old.cell("open('/api/big.bin', 'rb').read(); x = 1")
            await old.cell("import ubertool\nubertool.save_playbook('kept', 'd')")
        async with open_run(load_policy(path), journal=journal) as new:
            await new.cell("open('/api/note.txt').read()")
            with journal.store.transaction() as tx:
                tx.execute("UPDATE runs SET started = '2000-01-01T00:00:00+00:00' WHERE id = ?", (old.id,))
            pruned = journal.prune(older_than_s=86_400)
            assert pruned.runs == (old.id,) and pruned.bodies == 1  # the live run is kept
            assert journal.cells(old.id) == [] and len(journal.cells(new.id)) == 1
            playbook = old.workspace.parents[2] / "playbooks" / "kept.py"
    assert playbook.is_file() and playbook.with_name("kept.recording.json").is_file()
    done = ubertool("sessions", "prune", "--older-than", "0m", "--policy", str(path))
    assert done.returncode == 0 and done.stdout.startswith("Removed 1 runs and 1 bodies"), done.stdout
    assert "Removed 0 runs" in ubertool("sessions", "prune", "--max-mib", "1", "--policy", str(path)).stdout
    assert ubertool("sessions", "prune", "--older-than", "soon").returncode == 2


async def test_a_deep_tree_gets_a_result_and_is_removed_at_close(_isolated_home: Path, tmp_path: Path) -> None:
    """No recursion on guest-shaped data: the quota walk and the removal at close take any depth."""
    path = tmp_path / "policy.toml"
    path.write_text("[workspace]\nquota_mib = 1\n")
    deep = ("import os\nos.chdir('/workspace')\n"
            "for _ in range({levels}):\n    os.mkdir({name!r}); os.chdir({name!r})\n"
            "open('x', 'w').write('y')")
    async with open_run(load_policy(path)) as run:
        shallow = await run.cell(deep.format(levels=1500, name="a"))
        assert shallow.status is Status.OK, shallow
        # As deep as the guest's own path limit lets it go: still a result, and the session goes on.
        too_long = await run.cell(deep.format(levels=40, name="b" * 200))
        assert too_long.status in (Status.OK, Status.ERROR, Status.DENIED), too_long
        if too_long.status is Status.DENIED:  # deeper than the host walks by path: said so
            assert "cannot be measured" in too_long.message
        assert str((await run.cell("1 + 1")).value) == "2"
        workspace = run.workspace
    assert not workspace.exists()


async def test_output_written_below_sys_stdout_counts_against_the_cap(_isolated_home: Path,
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[limits]\noutput_bytes = 4096\n")
    async with open_run(load_policy(path)) as run:
        result = await run.cell("import os\nos.write(1, b'x' * 200_000)\nos.write(2, b'e' * 50_000)\nNone")
    assert result.status is Status.OUTPUT_TRUNCATED, result.status
    assert len(str(result.stdout.head + result.stdout.tail)) <= 4096
    assert result.stdout.dropped >= 200_000 - 4096 and result.stderr.dropped >= 50_000 - 4096


async def test_a_restore_from_an_image_still_answers_reads_made_before_it(api: tuple[str, ApiState],
                                                                          tmp_path: Path) -> None:
    """A read answered from the run's answers after the image is replayed from the answers the
    image's checkpoint kept, not asked of the server or the recording again."""
    url, state = api
    async with open_run(load_policy(policy(tmp_path, url))) as run:
        first = await run.cell("import time\nfirst = open('/api/note.txt').read()\ntime.sleep(0.2)")
        again = await run.cell("again = open('/api/note.txt').read()")  # after the image: replayed
        assert (first.status, again.status, len(again.exchanges)) == (Status.OK, Status.OK, 0)
        stopped = await run.cell("import time\ntime.sleep(100)", timeout_s=1)
        assert stopped.status is Status.TIMEOUT and stopped.restored is not None
        assert stopped.restored.ok, stopped.restored
        assert str((await run.cell("first, again")).value) == "('v1', 'v1')"
    assert gets(state, "/note.txt") == 1


@pytest.mark.parametrize("target", ["/workspace/big.bin", "/tmp/big.bin"])
async def test_the_quota_holds_during_a_cell(_isolated_home: Path, tmp_path: Path, target: str) -> None:
    """A cell writing far past the quota (the workspace and /tmp together) is stopped while it
    writes, refused, and the folders are within the quota after it, as after every cell."""
    path = tmp_path / "policy.toml"
    path.write_text("[workspace]\nquota_mib = 20\n")
    write = (f"f = open({target!r}, 'wb')\nchunk = b'x' * 2**20\n"
             "for _ in range(2000):\n    f.write(chunk)\n    f.flush()\n")
    async with open_run(load_policy(path)) as run:
        assert (await run.cell("open('/workspace/kept.txt', 'w').write('kept')\nx = 41")).status is Status.OK
        started = time.monotonic()
        result = await run.cell(write, timeout_s=60)
        seconds = time.monotonic() - started
        assert result.status is Status.DENIED, result
        assert "wrote past the workspace quota" in result.message and target in result.message
        assert seconds < 30  # stopped long before it would have written 2 GB
        assert str((await run.cell("x + 1, open('/workspace/kept.txt').read()")).value) == "(42, 'kept')"
        session = run.session
        assert used_bytes(session._counted()) <= 20 * MIB
        # Cells that each fit, but not together: the second is refused and emptied.
        first = await run.cell("open('/workspace/a.bin', 'wb').write(b'a' * 12 * 2**20)")
        second = await run.cell("open('/workspace/b.bin', 'wb').write(b'b' * 12 * 2**20)")
        assert (first.status, second.status) == (Status.OK, Status.DENIED)
        assert used_bytes(session._counted()) <= 20 * MIB


async def test_a_host_memory_budget_closes_idle_sessions_before_refusing(_isolated_home: Path,
                                                                          tmp_path: Path) -> None:
    """Sessions hold guest memory (and images) on the host: past `limits.host_memory_mib` a new
    session first closes the least recently used idle one, and is refused only when all are busy."""
    from ubertool.runtime.sessions import NEW_SESSION_BYTES, SessionError, SessionManager

    path = tmp_path / "policy.toml"
    path.write_text("[limits]\nhost_memory_mib = 256\nmax_sessions = 64\n"
                    "[server]\nmax_sessions_per_principal = 64\n")
    async with SessionManager(load_policy(path)).running() as manager:
        handles = []
        for _ in range(8):
            async with manager.use(None, None) as (handle, run):
                await run.cell("x = bytearray(8 * 2**20)")
                handles.append(handle)
            assert manager.host_bytes() + NEW_SESSION_BYTES <= 256 * 2**20 + run.session.host_bytes
        assert len(manager._live) < 8 and handles[0] not in manager._live  # the oldest went first
        assert handles[-1] in manager._live
        async with manager.use(handles[-1], None):
            busy_cells = [manager.use(h, None) for h in list(manager._live) if h != handles[-1]]
            async with contextlib.AsyncExitStack() as stack:
                for hold in busy_cells:
                    await stack.enter_async_context(hold)
                with pytest.raises(SessionError, match=r"limits\.host_memory_mib"):
                    async with manager.use(None, None):
                        pass


async def test_an_expect_pattern_cannot_hold_the_host(_isolated_home: Path, tmp_path: Path) -> None:
    """Guest patterns are matched in linear time (RE2): catastrophic backtracking in Python's `re`
    held the GIL, so the whole server, past every timeout."""
    path = tmp_path / "policy.toml"
    path.write_text("[tools.programs.sqlite]\nargv = ['sqlite3', '-safe', '-interactive']\ntimeout_s = 2\n")
    async with open_run(load_policy(path)) as run:
        started = time.monotonic()
        result = await run.cell("from ubertool import programs\ndb = programs.spawn('sqlite')\n"
                                "db.expect('sqlite> ')\ndb.sendline(\"select '\" + 'a' * 40 + \"';\")\n"
                                "db.expect(r'(a+)+b', timeout=2)", timeout_s=20)
        assert result.error is not None and "timed out after 2 s" in result.error.message, result
        assert time.monotonic() - started < 15
        refused = await run.cell("db.expect(r'(a)\\1')")
        assert refused.error is not None and "RE2 regular expressions" in refused.error.message
