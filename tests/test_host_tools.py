"""Host tools from sandbox code: real programs under pexpect, a real upstream MCP server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import cli_env, ubertool_command
from guest import ok, refused
from servers import free_port

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import Run, open_run
from ubertool.sandbox import Status

pytestmark = pytest.mark.anyio
UPSTREAM = Path(__file__).with_name("upstream_server.py")
PYTHON = os.path.realpath(sys.executable)  # the interpreter itself, not the venv's link to it


def policy_text() -> str:
    return f"""
[tools.programs.sqlite]
argv = ["sqlite3", "-interactive"]
timeout_s = 5

[tools.programs.python]
argv = ["{PYTHON}", "-i", "-q"]
ro_binds = ["{sys.base_prefix}"]

[tools.programs.cat]
argv = ["cat"]
timeout_s = 1

[tools.programs.echo]
argv = ["echo"]
extra_args = 2

[tools.programs.pwd]
argv = ["pwd"]
cwd = "jobs/today"

[tools.mcp.tracker]
command = ["{sys.executable}", "{UPSTREAM}"]
allow = ["add", "search_*", "explode"]
"""


@asynccontextmanager
async def tool_run(tmp_path: Path, journal: Journal | None = None) -> AsyncIterator[Run]:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text())
    async with open_run(load_policy(policy), journal=journal) as run:
        yield run


async def test_drive_sqlite_and_python_from_sandbox_code(tmp_path: Path) -> None:
    async with tool_run(tmp_path) as run:
        assert await ok(run, "from ubertool import programs\ndb = programs.spawn('sqlite')\n"
                             "db.expect('sqlite> ')\n"
                             "db.sendline('create table t(x); insert into t values (20), (22);')\n"
                             "db.expect('sqlite> ')\ndb.sendline('select sum(x) from t;')\n"
                             "db.expect('sqlite> ')\ndb.before.strip()") == "'42'"
        assert await ok(run, "py = programs.spawn('python')\npy.expect('>>> ')\npy.sendline('2 ** 10')\n"
                             "py.expect('>>> ')\npy.before.strip()") == "'1024'"
        assert await ok(run, "e = programs.spawn('echo', ['hello', 'there'])\ne.expect('there')\n"
                             "e.before") == "'hello '"
        await ok(run, "db.sendline('.quit')\ndb.close()")
        assert await ok(run, "db.exitstatus") == "0"
        where = await ok(run, "w = programs.spawn('pwd')\nw.expect('today')\nw.before + w.after")
        assert where == "'/workspace/jobs/today'"  # the jail shows the folder where the guest sees it
        assert await ok(run, "import os\nos.path.isdir('/workspace/jobs/today')") == "True"
        message = await refused(run, "import shutil\nshutil.rmtree('/workspace/jobs')\n"
                                     "os.symlink('..', '/workspace/jobs')\nprograms.spawn('pwd')")
        assert message == ("program 'pwd': its folder 'jobs/today' is not a folder of the workspace "
                           "(a link or a file is on the way)")
        assert not (run.workspace.parent / "today").exists()


async def test_refusals_name_the_policy_line(tmp_path: Path) -> None:
    async with tool_run(tmp_path) as run:
        await ok(run, "from ubertool import programs")
        assert await refused(run, "programs.spawn('bash')") == (
            "no program 'bash' in the policy (allowed: cat, echo, pwd, python, sqlite); an operator adds "
            "[tools.programs.bash] with its argv")
        assert await refused(run, "programs.spawn('echo', ['a', 'b', 'c'])") == (
            "program 'echo' takes at most 2 extra arguments (policy tools.programs.echo.extra_args)")
        assert await refused(run, "programs.spawn('echo', ['$(id)'])") == (
            "argument '$(id)' does not match tools.programs.echo.arg_pattern")
        message = await refused(run, "programs.spawn('sqlite', ['x'])")
        assert message.startswith("program 'sqlite' takes at most 0")


async def test_a_hung_program_times_out_and_no_child_survives_the_run(tmp_path: Path) -> None:
    async with tool_run(tmp_path) as run:
        message = await refused(run, "from ubertool import programs\nc = programs.spawn('cat')\n"
                                     "c.expect('never printed')")
        assert message == "timed out after 1 s waiting for ['never printed']; printed so far: ''"
        pids = eval(await ok(run, "d = programs.spawn('python')\n(c.pid, d.pid)"))
        for pid in pids:
            os.kill(pid, 0)  # alive while the run lasts
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_programs_survive_a_restore_without_respawning(tmp_path: Path) -> None:
    async with tool_run(tmp_path) as run:
        await ok(run, "from ubertool import programs\npy = programs.spawn('python')\npy.expect('>>> ')\n"
                      "py.sendline('counter = 1')\npy.expect('>>> ')")
        result = await run.cell("import time\ntime.sleep(100)", timeout_s=0.5)
        assert result.restored is not None and result.restored.ok
        assert await ok(run, "py.sendline('counter + 1')\npy.expect('>>> ')\npy.before.strip()") == "'2'"


async def test_upstream_mcp_tools_from_code(tmp_path: Path) -> None:
    async with tool_run(tmp_path) as run:
        assert await ok(run, "from ubertool import mcp\nmcp.servers()") == "['tracker']"
        names = await ok(run, "[t['name'] for t in mcp.tools('tracker')]")
        assert names == "['add', 'search_issues', 'explode']"
        found = await ok(run, "[t['name'] for t in mcp.tools('tracker', query='issue')]")
        assert found == "['search_issues']"
        schema = await ok(run, "mcp.tools('tracker', query='add')[0]['input_schema']['required']")
        assert schema == "['a', 'b']"
        assert await ok(run, "mcp.call('tracker', 'add', a=20, b=22)") == "42"
        assert await ok(run, "mcp['tracker'].search_issues(query='crash', limit=1)") == \
            "{'query': 'crash', 'issues': [{'id': 1, 'title': 'crash #1'}]}"
        assert await refused(run, "mcp.call('tracker', 'explode', reason='disk full')") == \
            "tracker.explode failed: exploded: disk full"
        assert await refused(run, "mcp.call('tracker', 'delete_everything')") == (
            "tool 'delete_everything' of MCP server 'tracker' is not allowed (policy tools.mcp.tracker.allow "
            "is ['add', 'search_*', 'explode'])")
        message = await refused(run, "mcp.call('github', 'x')")
        assert message.startswith("no MCP server 'github' in the policy")


async def test_a_playbook_that_used_the_tools_replays(tmp_path: Path, _isolated_home: Path) -> None:
    with Journal(default_journal_path()) as journal:
        async with tool_run(tmp_path, journal) as run:
            await ok(run, "from ubertool import programs, mcp\ndb = programs.spawn('sqlite')\n"
                          "db.expect('sqlite> ')\ndb.sendline('select 6 * 7;')\ndb.expect('sqlite> ')\n"
                          "answer = int(db.before.strip())")
            await ok(run, "total = mcp.call('tracker', 'add', a=answer, b=8)\nprint('total', total)")
            saved = await ok(run, "import ubertool\nubertool.save_playbook('tools-demo')")
    playbook = Path(eval(saved)["path"])
    env = cli_env()
    for extra in ([], ["--offline", "--check"]):
        done = subprocess.run([ubertool_command(), "replay", str(playbook), *extra], capture_output=True,
                              text=True, timeout=120, env=env)
        assert (done.returncode, done.stdout) == (0, "total 50\n"), done.stderr


async def test_every_tool_call_is_audited(tmp_path: Path, _isolated_home: Path) -> None:
    import json

    async with tool_run(tmp_path) as run:
        await ok(run, "from ubertool import programs, mcp\n"
                      "e = programs.spawn('echo', ['hi'])\ne.expect('hi')")
        await run.cell("programs.spawn('bash')")
        await ok(run, "mcp.call('tracker', 'add', a=1, b=2)")
    lines = next(_isolated_home.glob("runs/*/audit.jsonl")).read_text().splitlines()
    calls = [(e["tool"], e["ok"]) for e in map(json.loads, lines) if e["event"] == "tool_call"]
    assert calls == [("programs.spawn", True), ("programs.expect", True), ("programs.spawn", False),
                     ("mcp.call", True)]


async def test_an_upstream_command_runs_from_the_policys_folder(tmp_path: Path) -> None:
    """`command = ["python", "server.py"]` finds server.py beside the policy, wherever ubertool runs."""
    folder = tmp_path / "policies"
    folder.mkdir()
    shutil.copy(UPSTREAM, folder / "tracker.py")
    policy = folder / "policy.toml"
    policy.write_text(f'[tools.mcp.tracker]\ncommand = ["{sys.executable}", "tracker.py"]\nallow = ["add"]\n')
    assert load_policy(policy).tools.mcp["tracker"].cwd == str(folder.resolve())
    async with open_run(load_policy(policy)) as run:
        result = await run.cell("from ubertool import mcp\nmcp.call('tracker', 'add', a=1, b=2)")
    assert result.status is Status.OK, result


FAILING = Path(__file__).with_name("failing_upstream.py")
LEAKED = "upstream-token-6f0c2a9e"  # the run's credential, which a stdio upstream prints


def failing_policy(tmp_path: Path) -> Path:
    exits = tmp_path / "exits.py"
    exits.write_text("import os, sys\n"
                     "print('EXITS BANNER: cannot start', os.environ['LEAK'], file=sys.stderr)\n"
                     "sys.exit(3)\n")
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[tools.mcp.missing]
command = ["no-such-upstream-program"]
allow = ["*"]

[tools.mcp.exits]
command = ["{sys.executable}", "{exits}"]
env = {{ LEAK = "{LEAKED}" }}
allow = ["*"]

[tools.mcp.failing]
command = ["{sys.executable}", "{FAILING}"]
allow = ["*"]
timeout_s = 1

[tools.mcp.relative]
command = ["./tracker.sh"]
allow = ["*"]

[tools.mcp.refusing]
url = "http://127.0.0.1:{free_port()}/mcp"
credential = "tok"
allow = ["*"]

[credentials.tok]
source = "env"
env = "UPSTREAM_TOKEN"
""")
    return policy


async def test_a_failing_upstream_is_named_audited_and_its_stderr_kept_in_the_run(
        tmp_path: Path, _isolated_home: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way an upstream fails reaches the guest as what happened (never "internal error"),
    is audited with its stderr's last lines, and its stderr goes to the run's folder, not ours,
    with the run's secrets redacted."""
    import json

    monkeypatch.setenv("UPSTREAM_TOKEN", LEAKED)
    async with open_run(load_policy(failing_policy(tmp_path))) as run:
        await ok(run, "from ubertool import mcp")
        assert (await refused(run, "mcp.tools('refusing')")).startswith(  # its credential is minted
            "MCP server 'refusing' failed while starting: connection failed (")
        assert await refused(run, "mcp.call('missing', 'x')") == (
            "MCP server 'missing' failed while starting: command 'no-such-upstream-program' not found "
            "on PATH")
        kept = "; its stderr is kept for the operator with the run's audit log"
        assert await refused(run, "mcp.call('exits', 'x')") == (
            f"MCP server 'exits' failed while starting: exited with code 3{kept}")
        assert await ok(run, "mcp.call('failing', 'add', a=1, b=2)") == "3"
        assert await refused(run, "mcp.call('failing', 'crash')") == (
            f"MCP server 'failing' failed while calling crash: exited with code 7; the next call starts "
            f"it again{kept}")
        assert await ok(run, "mcp.call('failing', 'add', a=2, b=2)") == "4"  # started again
        assert await refused(run, "mcp.call('failing', 'slow', seconds=5)") == (
            f"MCP server 'failing' failed while calling slow: timed out after 1 s (policy "
            f"tools.mcp.failing.timeout_s){kept}")
        assert await refused(run, "mcp.call('relative', 'x')") == (
            f"MCP server 'relative' failed while starting: command './tracker.sh' not found (looked in "
            f"{tmp_path.resolve()})")
    folder = next(_isolated_home.glob("runs/*"))
    events = [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]
    failed = [(e["server"], e["during"], e.get("stderr_tail", [])[:1]) for e in events
              if e["event"] == "mcp_failed"]
    assert failed == [("refusing", "starting", []), ("missing", "starting", []),
                      ("exits", "starting", ["EXITS BANNER: cannot start [redacted:tok]"]),
                      ("failing", "calling crash", ["FAILING-UPSTREAM BANNER v1"]),
                      ("failing", "calling slow", ["FAILING-UPSTREAM BANNER v1"]),
                      ("relative", "starting", [])]
    calls = [e["ok"] for e in events if e["event"] == "tool_call"]
    assert calls == [False, False, False, True, False, True, False, False]
    assert (folder / "mcp-exits.stderr").read_text() == "EXITS BANNER: cannot start [redacted:tok]\n"
    assert "crashing now" in (folder / "mcp-failing.stderr").read_text()
    printed = capfd.readouterr()
    assert "BANNER" not in printed.err + printed.out and "crashing now" not in printed.err


def test_an_upstreams_stderr_file_is_bounded(tmp_path: Path) -> None:
    """An upstream that floods stderr fills at most the limit; the rest is read and dropped."""
    from ubertool.tools.upstream import StderrLog

    with StderrLog(tmp_path / "flood.stderr", str, limit=1000) as log:
        assert log.writer is not None
        done = subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('x' * 200_000)"],
                              stderr=log.writer, timeout=30)
        log.spawned()
        assert done.returncode == 0 and log.exit_code(wait_s=5) is None
    text = (tmp_path / "flood.stderr").read_text()
    assert text.startswith("x" * 1000) and len(text) < 1100 and "cut here" in text
