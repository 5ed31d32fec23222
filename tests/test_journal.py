"""The journal on both stores (the default SQLite file and PostgreSQL started by the test), a
whole MCP session journaled on PostgreSQL and everything the CLI does with it, and the
PostgreSQL URL's password kept out of every message, log, policy listing and audit line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import JournalBackend, cli_env, ubertool_command
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from postgres import Postgres

from ubertool.runtime.journal import Journal, JournalCell
from ubertool.runtime.policy import PolicyError, default_policy, load_policy
from ubertool.runtime.runs import open_run
from ubertool.runtime.stores import PostgresStore, masked_url
from ubertool.sandbox import Status
from ubertool.tools.recorder import Exchange

pytestmark = pytest.mark.anyio


def ubertool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ubertool_command(), *args], capture_output=True, text=True, timeout=300,
                          env=cli_env())


def cell(number: int, body: bytes) -> JournalCell:
    exchange = Exchange("http", {"method": "GET", "path": "/a"}, {"status": 200, "body": body}, True)
    return JournalCell(number, f"x = {number}", "ok", "out\n", "", None, None, None, 0.25, (exchange,))


def test_runs_cells_bodies_and_prune(journal_backend: JournalBackend) -> None:
    with Journal(journal_backend.store()) as journal:
        journal.start_run("20260101T000000-aaaa", "mcp", "p.toml", "0" * 64)
        journal.name_session("20260101T000000-aaaa", "s-one")
        journal.add_cell("20260101T000000-aaaa", cell(1, b"shared body"))
        journal.add_cell("20260101T000000-aaaa", cell(2, b"shared body"))  # kept once
        journal.add_cell("20260101T000000-aaaa", cell(2, b"\x00\xffbinary"))  # a retry replaces it
        journal.end_run("20260101T000000-aaaa")
        journal.start_run("20260101T000001-bbbb", "run", "p.toml", "0" * 64)  # still going
        journal.add_cell("20260101T000001-bbbb", cell(1, b"shared body"))

        (newest, oldest) = journal.runs()
        assert (newest.id, newest.cells, newest.ended) == ("20260101T000001-bbbb", 1, None)
        assert (oldest.session, oldest.cells, oldest.ended is not None) == ("s-one", 2, True)
        assert journal.find_run("s-one") == journal.find_run("20260101T000000") == oldest
        assert journal.find_run("2026") is None  # not unique
        cells = journal.cells(oldest.id)
        assert [c.exchanges[0].response["body"] for c in cells] == [b"shared body", b"\x00\xffbinary"]
        assert cells[0].duration_s == 0.25 and cells[0].exchanges[0].reusable

        pruned = journal.prune(older_than_s=0)
        assert pruned.runs == (oldest.id,) and pruned.bodies == 1  # the other run still needs its body
        assert journal.cells(oldest.id) == [] and len(journal.cells(newest.id)) == 1
        assert pruned.held_bytes == journal.prune().held_bytes > 0


def test_session_images_are_kept_by_handle(journal_backend: JournalBackend) -> None:
    with Journal(journal_backend.store()) as journal:
        assert journal.get_image("s-x") is None
        journal.put_image("s-x", b"\x00image-1", {"cells": 3, "memory_mib": 41})
        journal.put_image("s-x", b"\x00image-2", {"cells": 4})  # the latest replaces it
        journal.put_image("s-y", b"other", {})
        image = journal.get_image("s-x")
        assert image is not None and (image.data, image.meta) == (b"\x00image-2", {"cells": 4})
        assert journal.delete_image("s-x") and not journal.delete_image("s-x")
        assert journal.get_image("s-x") is None
        # A pruned run takes its session's image with it.
        journal.start_run("20260101T000000-cccc", "mcp", "p", "")
        journal.name_session("20260101T000000-cccc", "s-y")
        journal.end_run("20260101T000000-cccc")
        journal.prune(older_than_s=0)
        assert journal.get_image("s-y") is None
    with Journal(journal_backend.store()) as again:  # committed: another connection sees it
        again.put_image("s-z", b"z", {"k": "v"})
    with Journal(journal_backend.store()) as third:
        assert third.get_image("s-z") is not None


async def test_a_run_is_journaled(journal_backend: JournalBackend, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(journal_backend.toml())
    loaded = load_policy(policy)
    with Journal.default(loaded.journal) as journal:
        async with open_run(loaded, journal=journal) as run:
            result = await run.cell("print(6 * 7)")
            assert not result.notes  # committed, no "could not record" note
        (found,) = journal.runs()
        assert found.id == run.id and found.ended is not None
        assert [c.stdout for c in journal.cells(run.id)] == ["42\n"]


async def test_a_lost_database_connection_costs_one_cell_its_journal_entry(
        postgres: Postgres, _isolated_home: Path) -> None:
    import psycopg

    url = postgres.url(postgres.new_database())
    with Journal(PostgresStore(url)) as journal, psycopg.connect(url, autocommit=True) as admin:
        async with open_run(default_policy(), journal=journal) as run:
            first = await run.cell("x = 1")
            # Acknowledged means committed: another connection sees the cell already.
            assert not first.notes and admin.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 1
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")  # a restart
            lost = await run.cell("x = 2")
            assert lost.status is Status.OK and "the journal could not record this cell" in lost.notes[-1]
            assert postgres.password not in lost.notes[-1]
            assert not (await run.cell("x = 3")).notes  # connected again
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        # The run ended all the same (its end is not journaled: it stays listed as going).
        assert [c.code for c in journal.cells(run.id)] == ["x = 1", "x = 3"]
    audit = next(_isolated_home.glob("runs/*/audit.jsonl")).read_text()
    assert audit.count('"event": "journal_failed"') == 2 and postgres.password not in audit


def test_a_wrong_url_names_journal_url_and_never_the_password(postgres: Postgres, tmp_path: Path) -> None:
    secret = "s3cret-Pass-123"
    for index, url in enumerate((postgres.url(password=secret),  # wrong password
                                 f"postgresql://ubertool_test:{secret}@127.0.0.1:1/postgres")):  # no server
        policy = tmp_path / f"policy{index}.toml"
        policy.write_text(f'[journal]\nurl = "{url}"\n')
        done = ubertool("run", "--policy", str(policy), "-c", "1")
        assert done.returncode == 2, done.stderr
        assert "journal.url: cannot open the PostgreSQL journal at postgresql://ubertool_test:***@" \
            in done.stderr
        assert "remove journal.url to use the local SQLite journal" in done.stderr
        assert secret not in done.stderr + done.stdout and "Traceback" not in done.stderr
        listed = ubertool("sessions", "list", "--policy", str(policy))
        assert listed.returncode == 2 and "journal.url" in listed.stderr and secret not in listed.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[journal]\nurl = "mysql://root:{secret}@db/x"\n')
    with pytest.raises(PolicyError) as problem:
        load_policy(bad)
    assert "journal.url: must be a PostgreSQL URL" in str(problem.value) and secret not in str(problem.value)


def test_masked_url_hides_every_password_form() -> None:
    assert masked_url("postgresql://u:p%40ss@h:5/db?password=q&sslmode=require") == (
        "postgresql://u:***@h:5/db?password=***&sslmode=require")
    assert masked_url("postgresql://u@h/db") == "postgresql://u@h/db"


async def test_mcp_session_on_postgres_then_list_dump_replay_prune(postgres: Postgres, tmp_path: Path,
                                                                  _isolated_home: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[journal]\nurl = "{postgres.url(postgres.new_database())}"\n')
    log = tmp_path / "server.log"  # the server's own log (its stderr)
    async with Client(StdioTransport(ubertool_command(), ["serve", "--policy", str(policy)],
                                     env=cli_env(FASTMCP_LOG_LEVEL="DEBUG"), log_file=log)) as client:
        async def call(code: str) -> dict:
            return (await client.call_tool("python", {"code": code}, raise_on_error=False)).structured_content

        assert (await call("items = [4, 5, 6]"))["status"] == "ok"
        assert (await call("print('total is', sum(items))"))["status"] == "ok"
        about = await call("import ubertool\nubertool.about()")  # prints what the guest has
        assert "WebAssembly" in about["stdout"]
    assert not (_isolated_home / "journal.sqlite").exists()  # nothing went to the SQLite file

    listed = ubertool("sessions", "list", "--policy", str(policy))
    assert listed.returncode == 0 and " mcp " in listed.stdout, listed.stderr
    run_id = next(line.split()[0] for line in listed.stdout.splitlines() if " mcp " in line)
    book = tmp_path / "book.py"
    dumped = ubertool("sessions", "dump", run_id, "--policy", str(policy), "-o", str(book))
    assert dumped.returncode == 0, dumped.stderr
    replayed = ubertool("replay", str(book))
    assert replayed.returncode == 0 and replayed.stdout.startswith("total is 15\n"), replayed.stderr
    shown = ubertool("policy", "show", "--policy", str(policy)).stdout
    assert f"ubertool_test:***@127.0.0.1:{postgres.port}/" in shown

    # The password is in no reply, file ubertool wrote, listing or policy dump.
    written = [p.read_text(errors="replace") for p in _isolated_home.rglob("*") if p.is_file()]
    written += [book.read_text(), book.with_name("book.recording.json").read_text(), log.read_text()]
    assert "Starting MCP server" in log.read_text()
    for text in (json.dumps(about), listed.stdout, dumped.stdout + dumped.stderr, shown, *written):
        assert postgres.password not in text

    replay_run = next(line.split()[0] for line in ubertool("sessions", "list", "--policy", str(policy))
                      .stdout.splitlines() if " replay " in line)  # the replay was journaled there too
    pruned = ubertool("sessions", "prune", "--policy", str(policy), "--older-than", "0m")
    assert pruned.returncode == 0 and pruned.stdout.startswith("Removed "), pruned.stderr
    assert replay_run not in ubertool("sessions", "list", "--policy", str(policy)).stdout
