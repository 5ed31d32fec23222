"""Sessions that outlive their process: the monotonic clock across new interpreters, a session
saved and resumed (image or replay), the persisted store's authentication and ownership, and a
real server restarted under a real MCP client. Real sandbox throughout."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from conftest import JournalBackend, cli_env, ubertool_command
from fastmcp import Client
from fastmcp.server.auth.providers.jwt import RSAKeyPair
from servers import free_port, start_http_server
from test_http_front_door import AUDIENCE, ISSUER, KID, as_principal, audit, call, jwks_server, text

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.persist import Record, RecordRefused, SessionStore
from ubertool.runtime.policy import default_policy
from ubertool.runtime.runs import open_run
from ubertool.runtime.sessions import SessionManager, _Live, save_due, saved
from ubertool.sandbox import (
    PastCell,
    Resume,
    SandboxConfig,
    SandboxSession,
    Status,
    engine,
    imagefile,
    images,
)
from ubertool.sandbox import session as session_module

pytestmark = pytest.mark.anyio

SLEEP = "import time\ntime.sleep(100)"  # one C call: only the hard stop ends it


async def test_the_monotonic_clock_never_goes_back_across_a_hard_stop(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert images.check() == ""
    monkeypatch.setattr(session_module, "IMAGE_AFTER_S", -1.0)  # an image after every cell
    await session.run("import time\nt0 = time.monotonic(); p0 = time.perf_counter_ns()")
    stopped = await session.run(SLEEP, timeout_s=1.0)
    assert stopped.status is Status.TIMEOUT and stopped.restored is not None and stopped.restored.ok
    after = await session.run("time.monotonic() - t0, time.perf_counter_ns() - p0")
    elapsed, elapsed_ns = eval(str(after.value))
    # The stopped cell ran for its 1 s limit: the clock saw that time pass, and never went back.
    assert elapsed >= 1.0 and elapsed_ns >= 10**9


async def test_the_clock_goes_on_when_images_are_off(
    make_config: Callable[..., SandboxConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "_checked", (False, "off for this test"))
    async with SandboxSession(make_config()) as session:
        # A replay measures `t0` again, so the value read before the stop is kept here.
        before = float(str((await session.run("import time\ntime.monotonic()")).value))
        await session.run(SLEEP, timeout_s=1.0)
        after = float(str((await session.run("time.monotonic()")).value))
        assert after - before >= 1.0


async def _saved_and_resumed(config: SandboxConfig, setup: str) -> tuple[SandboxSession, str]:
    """A session that ran `setup`, saved, closed, and a new one resumed from what it saved."""
    async with SandboxSession(config) as first:
        result = await first.run(setup)
        assert result.status is Status.OK, result
        saved = await first.save()
        history = tuple(PastCell(c.number, c.code, c.echo, c.status, c.exchanges, c.duration_s)
                        for c in first._history)
    return SandboxSession(config, resume=Resume(history, saved.image, saved.through, saved.next_cell,
                                                saved.clock_ns)), saved.why


@pytest.fixture
def rooted(make_config: Callable[..., SandboxConfig], tmp_path: Path) -> SandboxConfig:
    """A configuration with a private root of its own, as a saved session needs (it outlives the
    session that made it)."""
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    return replace(make_config(), root=root)


async def test_a_saved_session_resumes_exactly_in_a_new_session(rooted: SandboxConfig) -> None:
    config = rooted
    setup = ("import random, time\nr = random.random()\nt0 = time.monotonic()\n"
             "f = open('/tmp/held', 'w+'); f.write('abc'); f.flush()")
    resumed, why = await _saved_and_resumed(config, setup)
    assert why == ""
    async with resumed as session:
        result = await session.run("f.write('d'); f.seek(0); r2 = r; f.read(), time.monotonic() >= t0")
        assert str(result.value) == "('abcd', True)"
        assert result.cell == 2
        assert any("resumed after a server restart from its saved image" in n for n in result.notes)


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


@pytest.mark.parametrize("carried", [True, False])
async def test_a_session_moved_to_another_host_takes_its_folders(
        rooted: SandboxConfig, tmp_path: Path, carried: bool) -> None:
    setup = ("import random\nr = random.random()\nf = open('/tmp/held', 'w+'); f.write('abc'); f.flush()\n"
             "open('/workspace/log.txt', 'w').write('one\\n')")
    async with SandboxSession(rooted) as first:
        await first.run(setup)
        saved = await first.save(carry=True)
        r = (await first.run("r")).value
        await first.run("open('/workspace/log.txt', 'a').write('two\\n')")  # after the save
        history = tuple(PastCell(c.number, c.code, c.echo, c.status, c.exchanges, c.duration_s)
                        for c in first._history)
    assert saved.files is not None and saved.why == ""
    # Another host: other (empty) folders; the image carries its folders, or is without them.
    there = replace(rooted, workspace=_private(tmp_path / "elsewhere"), root=_private(tmp_path / "root2"))
    resume = Resume(history, saved.image, saved.through, saved.next_cell, saved.clock_ns,
                    files=saved.files if carried else None, moved="the loss of its node")
    async with SandboxSession(there, resume=resume) as session:
        result = await session.run("f.write('d'); f.seek(0); f.read(), r, open('/workspace/log.txt').read()")
        held, r_there, log = eval(str(result.value))
        assert (held, log) == ("abcd", "one\ntwo\n")  # each write once: none lost, none twice
        assert session.resumption is not None and session.resumption.from_image is carried
        if carried:
            assert r_there == float(str(r))  # the image's state, not a replay's
            assert any("after the loss of its node from its saved image and 2 later cells replayed" in n
                       for n in result.notes), result.notes
        else:
            assert r_there != float(str(r))
            assert any("by replaying its 3 cells (its saved image was not used: it was saved without "
                       "its folders)" in n for n in result.notes), result.notes



async def test_a_moved_session_whose_image_does_not_go_in_replays_into_empty_folders(
        rooted: SandboxConfig, tmp_path: Path) -> None:
    """The folders are unpacked before the image goes in; when it then cannot (here: a file
    number it holds cannot be kept; on a loaded host, memory that cannot grow), every cell is
    replayed, and must find the folders empty, not holding what those cells wrote already."""
    async with SandboxSession(rooted) as first:
        await first.run("open('/workspace/log.txt', 'a').write('one\\n')")
        saved = await first.save(carry=True)
        history = tuple(PastCell(c.number, c.code, c.echo, c.status, c.exchanges, c.duration_s)
                        for c in first._history)
    assert saved.image is not None and saved.files is not None
    fingerprint = engine.fingerprint(rooted)
    image = imagefile.loads(saved.image, fingerprint)
    unkept = images.OpenFile(4000, 3999, b"gone", 0, 0, 0, 0, 0, 0)  # under no preopen: no placeholder
    broken = imagefile.dumps(replace(image, files=(*image.files, unkept)), fingerprint)
    there = replace(rooted, workspace=_private(tmp_path / "elsewhere"), root=_private(tmp_path / "root2"))
    resume = Resume(history, broken, saved.through, saved.next_cell, saved.clock_ns,
                    files=saved.files, moved="the loss of its node")
    async with SandboxSession(there, resume=resume) as session:
        result = await session.run("open('/workspace/log.txt').read()")
        assert session.resumption is not None and not session.resumption.from_image
        assert str(result.value) == repr("one\n")  # written once, not once unpacked and once replayed

async def test_a_refused_image_falls_back_to_replay(rooted: SandboxConfig) -> None:
    config = rooted
    resumed, _ = await _saved_and_resumed(config, "x = 41")
    other = replace(config, about="another configuration")  # its fingerprint differs
    resumed.config = other
    async with resumed as session:
        result = await session.run("x + 1")
        assert str(result.value) == "42"
        assert any("by replaying its 1 cells" in n and "another configuration" in n for n in result.notes)


# ---- A real server, stopped and started again, under real MCP clients ---------------------------

def _flip_a_byte(path: Path, at: int) -> None:
    _flip_a_byte_in(path, path.read_bytes(), at)


def _flip_a_byte_in(path: Path, data: bytes, at: int) -> None:
    """Write `data` to `path` with its byte `at` changed."""
    changed = bytearray(data)
    changed[at] ^= 0x01
    path.write_bytes(bytes(changed))


async def test_a_session_outlives_a_server_restart(_isolated_home: Path, tmp_path: Path) -> None:
    keys = RSAKeyPair.generate()
    with jwks_server(keys) as jwks:
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[server.oauth]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
                          f'jwks_uri = "{jwks}"\n')
        alice, mallory = (keys.create_token(subject=who, issuer=ISSUER, audience=AUDIENCE, kid=KID)
                          for who in ("alice", "mallory"))
        env = {**cli_env(), "UBERTOOL_HOME": str(_isolated_home)}
        port = free_port()

        def restart(server: subprocess.Popen[bytes] | None) -> tuple[subprocess.Popen[bytes], str]:
            if server is not None:
                server.send_signal(signal.SIGTERM)  # the clean stop saves every session
                assert server.wait(timeout=60) == 0
            return start_http_server(ubertool_command(), env, ("--policy", str(policy)), port=port)

        server, url = restart(None)
        try:
            async with as_principal(url, alice) as client:
                first = await call(client, "import random\nr = random.random()\n"
                                           "f = open('/tmp/held', 'w+'); f.write('abc'); f.flush()\nrepr(r)")
                handle, r = first.structured_content["session"], first.structured_content["value"]
            server, url = restart(server)
            saved = _isolated_home / "sessions"
            assert (saved / f"{handle}.json").stat().st_mode & 0o777 == 0o600
            assert (_isolated_home / "sessions.key").stat().st_mode & 0o777 == 0o600

            # Another principal holding the handle gets exactly the unknown-handle answer.
            async with as_principal(url, mallory) as client:
                stolen = await call(client, "r", session=handle)
                assert stolen.is_error and text(stolen).startswith(f"no open session {handle!r}")
            async with as_principal(url, alice) as client:
                back = await call(client, "f.write('d'); f.seek(0); repr(r), f.read()", session=handle)
                assert back.structured_content["value"] == f"({r}, 'abcd')", text(back)
                assert any("from its saved image" in n for n in back.structured_content["notes"])
            with Journal(default_journal_path()) as journal:  # going again: no prune may take it
                (run,) = [r for r in journal.runs() if r.session == handle]
                assert run.ended is None and run.id not in journal.prune(older_than_s=0).runs

            # A byte of the saved image flipped: the image is refused, the session replays and says so.
            server, url = restart(server)
            _flip_a_byte(saved / f"{handle}.image", -100)
            async with as_principal(url, alice) as client:
                again = await call(client, "f.seek(0); f.read()", session=handle)
                assert again.structured_content["status"] == "ok", text(again)
                notes = " ".join(again.structured_content["notes"])
                assert "by replaying" in notes and "its MAC does not match" in notes, notes
        finally:
            server.terminate()
            server.wait(timeout=60)
    refused = [e for e in audit(_isolated_home, "server/audit.jsonl") if e["event"] == "session_refused"]
    assert [e["principal"] for e in refused] == ["oauth:mallory"]


async def test_an_idle_session_is_saved_and_survives_a_crash(_isolated_home: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[sessions]\npersist_idle_s = 0.5\n")
    env = {**cli_env(), "UBERTOOL_HOME": str(_isolated_home)}
    port = free_port()
    server, url = start_http_server(ubertool_command(), env, ("--policy", str(policy)), port=port)
    try:
        async with Client(url, timeout=60) as client:
            first = await call(client, "import random\nr = random.random()\nrepr(r)")
            handle, r = first.structured_content["session"], first.structured_content["value"]
            saved = _isolated_home / "sessions" / f"{handle}.image"
            for _ in range(100):  # saved once idle past persist_idle_s (the reaper looks every 0.25 s)
                if saved.exists():
                    break
                await anyio.sleep(0.1)
            assert saved.exists()
            await call(client, "later = [1, 2]", session=handle)  # in the journal, not in the image
        server.send_signal(signal.SIGKILL)  # no clean stop: only what was saved when idle
        server.wait(timeout=60)
        server, url = start_http_server(ubertool_command(), env, ("--policy", str(policy)), port=port)
        async with Client(url, timeout=60) as client:
            back = await call(client, "repr(r), later", session=handle)
            assert back.structured_content["value"] == f"({r}, [1, 2])", text(back)
            assert any("from its saved image and 1 later cells replayed" in n
                       for n in back.structured_content["notes"])
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---- The store on its own: what it refuses ------------------------------------------------------

def _store(home: Path) -> SessionStore:
    return SessionStore(home / "sessions", home / "sessions.key")


def _record(handle: str = "s-" + "a" * 16, owner: str = "alice") -> Record:
    return Record(handle, "run-1", owner, 3, 4, 10**9, 1.0, 0.0)


def test_the_store_refuses_what_was_changed(tmp_path: Path) -> None:
    (tmp_path / "sessions").mkdir(mode=0o700)
    store = _store(tmp_path)
    record = _record()
    store.save(record, b"memory" * 1000, b"folders" * 100)
    assert store.record(record.handle) == record
    assert store.image(record) == (b"memory" * 1000, "")
    assert store.files(record) == (b"folders" * 100, "")
    # Folders sealed as an image (or the other way round) are not taken for one.
    files = tmp_path / "sessions" / f"{record.handle}.files"
    sealed_files = files.read_bytes()
    files.write_bytes((tmp_path / "sessions" / f"{record.handle}.image").read_bytes())
    assert store.files(record)[0] is None
    _flip_a_byte_in(files, sealed_files, len(sealed_files) // 2)
    assert "MAC does not match" in store.files(record)[1]
    store.save(record, b"memory" * 1000)  # saved without folders: older ones are not kept
    assert not files.exists()
    image = tmp_path / "sessions" / f"{record.handle}.image"
    whole = image.read_bytes()

    image.write_bytes(whole[:-10])  # cut short
    assert store.image(record)[0] is None and "MAC does not match" in store.image(record)[1]
    image.write_bytes(whole)
    # The same image under a record that says another position (or owner) is not its image.
    assert store.image(replace(record, through=2))[0] is None
    assert store.image(replace(record, owner="mallory"))[0] is None
    # An image made with another key (another state folder) is refused.
    (tmp_path / "other").mkdir()
    assert SessionStore(tmp_path / "sessions", tmp_path / "other" / "key").image(record)[0] is None

    path = tmp_path / "sessions" / f"{record.handle}.json"
    path.write_text(path.read_text().replace('\\"owner\\": \\"alice\\"', '\\"owner\\": \\"mallory\\"'))
    assert "mallory" in path.read_text()
    with pytest.raises(RecordRefused, match="MAC"):
        store.record(record.handle)



def test_blobs_of_one_save_are_not_taken_with_another_at_the_same_position(tmp_path: Path) -> None:
    """Two saves between the same cells (calls that ran none: a background program, a file the
    host put in) differ only in their clock. An image or folders of the older one, put back
    beside the newer record (a torn save, or whoever writes the store), are refused: else a
    session would resume with files that were since changed, silently."""
    (tmp_path / "sessions").mkdir(mode=0o700)
    store = _store(tmp_path)
    older = _record()
    store.save(older, b"memory" * 1000, b"old folders" * 100)
    saved = tmp_path / "sessions"
    stale = {kind: (saved / f"{older.handle}.{kind}").read_bytes() for kind in ("image", "files")}
    newer = replace(older, clock_ns=older.clock_ns + 5 * 10**9, saved_at=5.0)
    store.save(newer, b"memory" * 1000, b"new folders" * 100)
    for kind, blob in stale.items():
        (saved / f"{older.handle}.{kind}").write_bytes(blob)
        assert getattr(store, kind)(newer)[0] is None, kind

def test_the_store_names_files_only_by_a_handle(tmp_path: Path) -> None:
    (tmp_path / "sessions").mkdir(mode=0o700)
    store = _store(tmp_path)
    for bad in ("../sessions.key", "s-../../x", "s-" + "a" * 15 + "/", ""):
        with pytest.raises(RecordRefused, match="not a session handle"):
            store.record(bad)
    assert (tmp_path / "sessions.key").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / "sessions.key").read_bytes()) == 32


# ---- The pool of ready sessions -----------------------------------------------------------------

async def test_a_new_session_comes_from_the_pool_ready_and_reseeded(_isolated_home: Path) -> None:
    policy = default_policy()
    # A template whose image holds `random`'s state: without the reseed, both would draw alike.
    sessions = policy.sessions.model_copy(update={"pool": 2, "template": ("random",)})
    policy = policy.model_copy(update={"sessions": sessions})
    with Journal(default_journal_path()) as journal:
        async with SessionManager(policy, journal=journal).running() as manager:
            with anyio.fail_after(120):
                while len(manager.pool.runs) < 2:
                    await anyio.sleep(0.05)
            pooled = {run.id for run in manager.pool.runs}
            drawn = []
            for _ in range(2):
                started = time.perf_counter()
                async with manager.use(None, None, "alice") as (handle, run):
                    result = await run.cell("import random\nrandom.random()")
                elapsed = time.perf_counter() - started
                assert run.id in pooled and run.record.principal == "alice"
                assert elapsed < 1.0  # milliseconds when the machine is quiet (bench/images.py)
                assert journal.find_run(handle) is not None  # journaled once taken
                drawn.append(str(result.value))
            assert drawn[0] != drawn[1]
            with anyio.fail_after(120):  # refilled in the background
                while len(manager.pool.runs) < 2:
                    await anyio.sleep(0.05)
    assert len(journal_runs(_isolated_home)) == 2  # the two never taken were not journaled


def journal_runs(home: Path) -> list[str]:
    with Journal(home / "journal.sqlite") as journal:
        return [run.id for run in journal.runs()]


def test_saved_sessions_sit_in_a_shared_journal_and_are_checked_there(journal_backend: JournalBackend,
                                                                       _isolated_home: Path) -> None:
    """With the journal on PostgreSQL, front ends share saved sessions through it; whoever can
    write the database still cannot forge one (the key stays in each front end's state folder)."""
    with Journal(journal_backend.store()) as journal:
        store = SessionStore.default(journal)
        shared = journal_backend.url is not None
        record = _record()
        store.save(record, b"memory" * 1000)
        folder = _isolated_home / "sessions"
        assert (folder.is_dir() and any(folder.glob("s-*"))) is not shared
        assert (journal.get_image(f"{record.handle}.image") is not None) is shared
        with Journal(journal_backend.store()) as other:  # another front end, same key file
            again = SessionStore.default(other)
            assert again.handles() == [record.handle]
            assert again.record(record.handle) == record
            assert again.image(record) == (b"memory" * 1000, "")
        if shared:
            stored = journal.get_image(f"{record.handle}.image")
            assert stored is not None
            journal.put_image(stored.session, stored.data[:-1] + bytes([stored.data[-1] ^ 1]), {})
            assert "MAC does not match" in store.image(record)[1]
        store.delete(record.handle)
        assert store.handles() == [] and store.record(record.handle) is None


async def test_an_idle_session_holds_its_image_compressed(_isolated_home: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Once it has rested `persist_idle_s`, a session's image counts compressed in the budget."""
    monkeypatch.setattr(session_module, "IMAGE_AFTER_S", -1.0)  # an image after every cell
    policy = default_policy()
    sessions = policy.sessions.model_copy(update={"pool": 0, "persist": False, "persist_idle_s": 0.5})
    policy = policy.model_copy(update={"sessions": sessions})
    with Journal(default_journal_path()) as journal:
        async with SessionManager(policy, journal=journal).running() as manager:
            async with manager.use(None, None, "alice") as (handle, run):
                await run.cell("import random\nr = random.random()")
            working = manager.host_bytes()
            with anyio.fail_after(60):
                while manager.host_bytes() > working - 10 * 2**20:
                    await anyio.sleep(0.1)
            async with manager.use(handle, None, "alice") as (_, again):
                assert (await again.cell("r")).status is Status.OK


async def test_a_session_called_all_the_time_is_saved_too(_isolated_home: Path) -> None:
    """A session that never rests persist_idle_s is saved once its unsaved cells have run that
    long and it rests a second: what a restore must replay stays bounded."""
    policy = default_policy()
    assert policy.sessions.persist_idle_s == 30
    async with open_run(policy) as run:
        await run.cell("x = 1")
        live = _Live("s-" + "a" * 16, "alice", run, AsyncExitStack(), calls=1)
        soon = time.monotonic() + 2
        assert not save_due(policy, live, soon)  # one short cell: it waits for 30 s of rest
        run.record.cells[-1] = replace(run.record.cells[-1], duration_s=30.0)  # as if it had run 30 s
        assert save_due(policy, live, soon)
        assert not save_due(policy, live, time.monotonic())  # not without a second of rest
        saved(live)
        assert not save_due(policy, live, soon)
        await run.cell("y = 2")
        live.calls += 1
        assert not save_due(policy, live, time.monotonic() + 2)  # only what ran since counts
