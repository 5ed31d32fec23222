"""Playbooks end to end: a session through a real MCP client, saved from inside the sandbox,
replayed by `ubertool replay` and by `python playbook.py`; mounts live and offline; broken ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, ubertool_command
from fakeapi import serve_api
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.anyio


def ubertool(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ubertool_command(), *args], capture_output=True, text=True, timeout=300,
                          env=cli_env(**env), cwd=cwd)


async def call(client: Client, code: str) -> dict:
    result = await client.call_tool("python", {"code": code}, raise_on_error=False)
    return result.structured_content


async def test_session_to_playbook_to_replay(_isolated_home: Path, tmp_path: Path) -> None:
    transport = StdioTransport(ubertool_command(), ["serve"], env=cli_env())
    async with Client(transport) as client:
        await call(client, "rate = 3\nitems = [4, 5, 6]")
        await call(client, "items")  # only looks: kept as a comment
        failed = await call(client, "total = sum(items) * rat")  # a typo: fails, left out
        assert failed["status"] == "error"
        await call(client, "total = sum(items) * rate\nprint('total is', total)")
        saved = await call(client, "import ubertool\nubertool.save_playbook('basket', 'Total of a basket', "
                                   "params={'rate': 3})")
        assert saved["status"] == "ok", saved
        playbook = Path(eval(saved["value"])["path"])  # the helper returns a dict
        resources = await client.read_resource("playbook://basket")
        assert "total = sum(items) * rate" in resources[0].text
        index = json.loads((await client.read_resource("playbook://index"))[0].text)
        assert index["playbooks"] == ["basket"]

    text = playbook.read_text()
    assert "# %% parameters\nrate = 3\n" in text
    assert "# %% cell 1\nitems = [4, 5, 6]\n" in text  # `rate = 3` moved to the parameters
    assert "# %% cell 2 (not replayed: it only inspects)\n# items\n" in text
    assert "* rat\n" not in text and "cell 3" not in text  # the failed cell is gone
    assert "save_playbook" not in text

    replayed = ubertool("replay", str(playbook))
    assert (replayed.returncode, replayed.stdout) == (0, "total is 45\n"), replayed.stderr
    direct = subprocess.run([sys.executable, str(playbook)], capture_output=True, text=True, timeout=300,
                            env=cli_env())
    assert (direct.returncode, direct.stdout) == (0, "total is 45\n"), direct.stderr
    override = ubertool("replay", str(playbook), "-p", "rate=10")
    assert (override.returncode, override.stdout) == (0, "total is 150\n")
    check = ubertool("replay", str(playbook), "-p", "rate=10", "--check")
    assert check.returncode == 3
    assert "cell 4: stdout differs: expected 'total is 45\\n', got 'total is 150\\n'" in check.stderr
    machine = json.loads(ubertool("replay", str(playbook), "--json").stdout)
    assert machine["exit_code"] == 0 and [c["number"] for c in machine["cells"]] == [1, 4]

    # The journal outlived the server: the session can be listed and dumped again from the CLI.
    listed = ubertool("sessions", "list").stdout
    assert " mcp " in listed
    run_id = next(line.split()[0] for line in listed.splitlines() if " mcp " in line)
    again = ubertool("sessions", "dump", run_id, "-o", str(tmp_path / "again.py"), "-p", "rate=3")
    assert again.returncode == 0, again.stderr
    assert ubertool("replay", str(tmp_path / "again.py")).stdout == "total is 45\n"


async def test_mount_playbook_replays_live_and_offline(_isolated_home: Path, tmp_path: Path) -> None:
    from ubertool.runtime.journal import Journal, default_journal_path
    from ubertool.runtime.policy import load_policy
    from ubertool.runtime.runs import open_run

    with serve_api() as (url, state):
        state.files["/prices.csv"] = b"item,price\ntea,4\ncoffee,6\n"
        policy = tmp_path / "policy.toml"
        policy.write_text(f"[[mounts]]\nkind = 'http'\nname = 'shop'\nguest = '/shop'\n"
                          f"base_url = '{url}/v1'\nwritable = true\nmethods = ['GET', 'PUT']\n")
        with Journal(default_journal_path()) as journal:
            async with open_run(load_policy(policy), journal=journal) as run:
                await run.cell("import csv\nprices = {r['item']: int(r['price']) for r in "
                               "csv.DictReader(open('/shop/prices.csv'))}")
                await run.cell("open('/shop/total.txt', 'w').write(str(sum(prices.values())))\n"
                               "print(sum(prices.values()))")
                run_id = run.id
        out = tmp_path / "books" / "shop.py"
        assert ubertool("sessions", "dump", run_id, "-o", str(out)).returncode == 0
        del state.files["/total.txt"]
        live = ubertool("replay", str(out))
        assert (live.returncode, live.stdout) == (0, "10\n"), live.stderr
        assert state.files["/total.txt"] == b"10"  # written again, live
        gets = sum(1 for method, _, _ in state.log if method == "GET")
    offline = ubertool("replay", str(out), "--offline", "--check")  # the server is stopped now
    assert (offline.returncode, offline.stdout) == (0, "10\n"), offline.stderr
    stopped = ubertool("replay", str(out))
    assert stopped.returncode == 1  # live, with no server: the read fails
    assert gets == 2


def test_example_playbooks_replay() -> None:
    primes = ubertool("replay", str(REPO / "playbooks" / "primes.py"), "-p", "limit=1000", "--check")
    assert primes.returncode == 3  # a different limit prints a different count...
    assert primes.stdout.endswith("168 primes up to 1000; the largest is 997\n")
    same = ubertool("replay", str(REPO / "playbooks" / "primes.py"), "--check")
    assert same.returncode == 0, same.stderr  # ...and the default reproduces the session
    sales = ubertool("replay", str(REPO / "playbooks" / "sales-report.py"), "--offline", "--check")
    assert sales.returncode == 0, sales.stderr
    assert sales.stdout == "region\nEMEA    120\nAPAC     80\nAMER     50\n"


def test_broken_playbooks_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    good = REPO / "playbooks" / "primes.py"
    syntax = tmp_path / "syntax.py"
    broken = good.read_text().replace("primes = np.flatnonzero(sieve)", "primes = np.flatnonzero(sieve")
    syntax.write_text(broken)
    done = ubertool("replay", str(syntax))
    assert done.returncode == 2 and f"ubertool replay: {syntax}:" in done.stderr
    assert "syntax error in cell 4" in done.stderr

    moved = tmp_path / "sales-report.py"
    shutil.copy(REPO / "playbooks" / "sales-report.py", moved)
    done = ubertool("replay", str(moved))
    assert done.returncode == 2
    missing = tmp_path / "shop-policy.toml"
    assert f"the playbook's policy {missing} is missing; pass --policy FILE" in done.stderr

    needs_token = tmp_path / "token-policy.toml"
    needs_token.write_text("[credentials.shop]\nsource = 'env'\nenv = 'SHOP_TOKEN_NOT_SET'\n")
    header = '"credentials": []'
    creds = tmp_path / "creds.py"
    creds.write_text(good.read_text().replace(header, '"credentials": ["shop"]'))
    done = ubertool("replay", str(creds), "--policy", str(needs_token))
    assert done.returncode == 2
    assert "credential 'shop' needs the environment variable SHOP_TOKEN_NOT_SET" in done.stderr
    done = ubertool("replay", str(creds))
    assert done.returncode == 2 and "has no credential 'shop'" in done.stderr

    done = ubertool("replay", str(good), "-p", "nope=1")
    assert done.returncode == 2
    assert "-p nope: not a parameter of primes (its parameters: limit)" in done.stderr
    not_a_playbook = tmp_path / "plain.py"
    not_a_playbook.write_text("print('hi')\n")
    done = ubertool("replay", str(not_a_playbook))
    assert done.returncode == 2 and "not an ubertool playbook" in done.stderr


def test_a_failing_cell_exits_1_and_names_it() -> None:
    done = ubertool("replay", str(REPO / "playbooks" / "primes.py"), "-p", "limit='many'")
    assert done.returncode == 1
    assert "TypeError" in done.stderr
    assert "replay stopped: cell 3 failed (error)" in done.stderr


def test_editor_cells_numbers_workspace_and_check(tmp_path: Path) -> None:
    """Cells an editor adds (percent format) run; every message names the playbook's own cells;
    --workspace keeps what the replay wrote; --check answers from the recording."""
    book = tmp_path / "primes.py"
    text = (REPO / "playbooks" / "primes.py").read_text()
    text += ("\n# %% [markdown]\n# Some notes, kept as text.\n"
             "\n# %% write it down\nopen('/workspace/count.txt', 'w').write(str(len(primes)))\n"
             "\n# %%\ndef explode():\n    raise ValueError('boom')\n"
             "\n# %% cell 9\nexplode()\n")
    book.write_text(text)
    shutil.copy(REPO / "playbooks" / "primes.recording.json", tmp_path)
    out = tmp_path / "out"
    done = ubertool("replay", str(book), "--workspace", str(out))
    assert done.returncode == 1
    assert (out / "count.txt").read_text() == "25"
    assert 'File "<cell-9>", line 1' in done.stderr and 'File "<cell at line ' in done.stderr
    assert "replay stopped: cell 9 failed (error)" in done.stderr
    machine = json.loads(ubertool("replay", str(book), "--json").stdout)
    assert machine["failed_cell"] == 9 and machine["failed"] == "cell 9"
    labels = [c["label"] for c in machine["cells"]]
    assert labels[-3].startswith("the cell at line") and labels[-3].endswith("(write it down)")

    check = ubertool("replay", str(REPO / "playbooks" / "primes.py"), "--check", "-p", "limit=1000")
    assert check.returncode == 3 and "note: --check compares with the session as dumped" in check.stderr
    assert ubertool("replay", str(book), "--live").returncode == 2  # --live goes with --check
