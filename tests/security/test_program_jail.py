"""Programs run in a bubblewrap jail: what the guest wrote in the workspace (a git config, a
Python module, a sqlite command, a planted link) may make a program run or open something, but
only inside the jail, which shows no host file beyond the system folders and writes nothing
outside the program's folder. Real programs, driven from real sandbox code."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import cli_env, ubertool_command
from guest import ok, refused

from ubertool.runtime.policy import PolicyError, load_policy
from ubertool.runtime.runs import Run, open_run
from ubertool.tools import ToolFailure
from ubertool.tools.programs import ProgramBroker, ProgramSpec
from ubertool.tools.recorder import Recorder
from ubertool.tools.redact import Redactor

pytestmark = pytest.mark.anyio
PYTHON = os.path.realpath(sys.executable)  # the interpreter itself, not the venv's link to it
SECRET = "host-secret-4f1c"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host folder outside every workspace, holding a secret a program must not read."""
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET + "\n")
    return folder


def programs(**extra: str) -> str:
    python = f'argv = ["{PYTHON}"{{}}]\nro_binds = ["{sys.base_prefix}"]'
    text = f"""
[tools.programs.git]
argv = ["git", "status", "--short"]

[tools.programs.json]
{python.format(', "-m", "json.tool"')}

[tools.programs.python]
{python.format(', "-i", "-q"')}

[tools.programs.sqlite]
argv = ["sqlite3", "-interactive"]

[tools.programs.safe_sqlite]
argv = ["sqlite3", "-safe", "-interactive"]

[tools.programs.cat]
argv = ["cat"]
extra_args = 1
"""
    return text + "".join(f"\n[tools.programs.{name}]\n{body}\n" for name, body in extra.items())


@asynccontextmanager
async def jail_run(tmp_path: Path, **extra: str) -> AsyncIterator[Run]:
    policy = tmp_path / "policy.toml"
    policy.write_text(programs(**extra))
    async with open_run(load_policy(policy)) as run:
        yield run


NEVER = r"[^\s\S]"  # a pattern that matches nothing: wait for the program's end


async def output_of(run: Run, name: str, *args: str) -> str:
    """Run a program to its end; what it printed (as the refusal to wait further reports it)."""
    message = await refused(run, f"from ubertool import programs\n"
                                 f"programs.spawn({name!r}, {list(args)!r}).expect({NEVER!r})")
    before, printed = message.split("; it printed: ", 1)
    assert before == f"program {name!r} ended before printing [{NEVER!r}]", message
    return str(eval(printed))


def attack(host: Path) -> str:
    """Shell that proves it ran (in the workspace, its working folder), then tries to write a host
    marker and to copy a host file into the workspace."""
    return f"echo ran > ran; echo owned > {host}/marker; cat {host}/secret.txt > leak 2>&1"


def contained(run: Run, host: Path) -> None:
    """The attack ran, in the jail: no host marker, no secret copied into the workspace."""
    assert (run.workspace / "ran").read_text() == "ran\n", "the planted code did not run at all"
    assert not (host / "marker").exists()
    assert SECRET not in (run.workspace / "leak").read_text()


async def test_git_fsmonitor_planted_by_the_guest_runs_contained(tmp_path: Path, host: Path) -> None:
    async with jail_run(tmp_path) as run:
        await ok(run, "import os\nfor d in ('objects', 'refs'): os.makedirs(f'/workspace/.git/{d}')\n"
                      "open('/workspace/.git/HEAD', 'w').write('ref: refs/heads/main\\n')\n"
                      "open('/workspace/.git/config', 'w').write("
                      f"'[core]\\n\\trepositoryformatversion = 0\\n\\tfsmonitor = \"{attack(host)}; false\"\\n')")
        await output_of(run, "git")
        contained(run, host)


async def test_python_dash_m_shadowed_by_a_guest_module_runs_contained(tmp_path: Path, host: Path) -> None:
    shadow = (f"import subprocess\nsubprocess.run({attack(host)!r}, shell=True)\n"
              "raise SystemExit('shadowed')\n")
    async with jail_run(tmp_path) as run:
        await ok(run, f"import os\nos.mkdir('/workspace/json')\n"
                      f"open('/workspace/json/__init__.py', 'w').write({shadow!r})")
        assert "shadowed" in await output_of(run, "json")  # the guest's module was imported: the jail is what holds
        contained(run, host)


async def test_sqlite_shell_runs_contained_and_safe_mode_refuses_it(tmp_path: Path, host: Path) -> None:
    async with jail_run(tmp_path) as run:
        await ok(run, "from ubertool import programs\ndb = programs.spawn('sqlite')\ndb.expect('sqlite> ')\n"
                      f"db.sendline({'.shell ' + attack(host)!r})\ndb.expect('sqlite> ')")
        contained(run, host)
        said = await refused(run, "s = programs.spawn('safe_sqlite')\ns.expect('sqlite> ')\n"
                                  "s.sendline('.shell id')\ns.expect('sqlite> ')")
        assert said == ("program 'safe_sqlite' ended before printing ['sqlite> ']; it printed: "
                        "'line 1: cannot run .shell in safe mode\\r\\n'")  # safe mode ends sqlite3


async def test_a_planted_link_renamed_to_the_top_reaches_no_host_file(tmp_path: Path, host: Path) -> None:
    async with jail_run(tmp_path) as run:
        depth = len(run.workspace.parts) - 1
        text = "../" * depth + str(host / "secret.txt").lstrip("/")
        # Made deep enough that the text stays inside the workspace (WASI checks it then),
        # then renamed to the top, where on the host it names the secret.
        deep = "/workspace/" + "/".join(["d"] * depth)
        await ok(run, f"import os\nos.makedirs({deep!r})\nos.symlink({text!r}, {deep + '/notes.txt'!r})\n"
                      f"os.rename({deep + '/notes.txt'!r}, '/workspace/notes.txt')")
        assert (run.workspace / "notes.txt").read_text() == SECRET + "\n"  # on the host, it would
        # The same links as the host sees them, absolute too.
        os.symlink(str(host / "secret.txt"), run.workspace / "absolute.txt")
        for name in ("notes.txt", "absolute.txt"):
            said = await output_of(run, "cat", name)
            assert SECRET not in said and "No such file or directory" in said


async def test_the_jail_shows_only_system_folders_and_its_own(tmp_path: Path, host: Path,
                                                              _isolated_home: Path) -> None:
    probe = ("import json, os; print(json.dumps([sorted(os.listdir('/')), sorted(os.listdir('/etc')), "
             "os.getcwd(), os.environ['HOME'], os.listdir(os.environ['HOME']), os.listdir('/tmp'), "
             f"[os.path.exists(p) for p in ({str(host)!r}, {str(_isolated_home)!r}, '/etc/shadow', "
             "'/var', '/sys')], [line.split()[1] for line in open('/proc/self/status') "
             "if line.startswith(('CapEff', 'NoNewPrivs'))]]))")
    look = f'argv = ["{PYTHON}", "-c", "{probe}"]\nro_binds = ["{sys.base_prefix}"]\ncwd = "job"'
    async with jail_run(tmp_path, look=look) as run:
        top, etc, cwd, home, in_home, in_tmp, exists, caps = json.loads(await output_of(run, "look"))
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"}
    bound = set(Path(sys.base_prefix).parts[1:2])  # the interpreter's own read-only bind
    assert set(top) - system - bound == {"dev", "etc", "home", "proc", "tmp", "workspace"}
    assert set(etc) <= {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "passwd",
                        "group", "nsswitch.conf"}
    assert (cwd, home, in_home, in_tmp) == ("/workspace/job", "/home/ubertool", [], [])
    assert exists == [False] * 5
    assert caps == ["0000000000000000", "1"]  # no capabilities, even when ubertool runs as root


async def test_no_network_unless_the_policy_says_so(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        dial = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        body = f'argv = ["{PYTHON}", "-c", "{dial}"]\nro_binds = ["{sys.base_prefix}"]\n'
        async with jail_run(tmp_path, dial=body, dial_net=body + "network = true\n") as run:
            said = await output_of(run, "dial")  # the jail's own loopback, where nothing listens
            assert said.rstrip().endswith("ConnectionRefusedError: [Errno 111] Connection refused")
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                server.accept()
            assert (await output_of(run, "dial_net")).strip() == "connected"


async def test_default_arg_pattern_refuses_options_newlines_and_climbing(tmp_path: Path) -> None:
    async with jail_run(tmp_path) as run:
        await ok(run, "from ubertool import programs")
        for arg in ("-n", "--help", "notes\n", "..", "../x", "a/../b", "a..b"):
            assert await refused(run, f"programs.spawn('cat', [{arg!r}])") == (
                f"argument {arg!r} does not match tools.programs.cat.arg_pattern")
        await ok(run, "open('/workspace/a.txt', 'w').write('A')\nc = programs.spawn('cat', ['a.txt'])\n"
                      "c.expect('A')")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_every_process_in_the_jail_ends_with_the_run(tmp_path: Path) -> None:
    async with jail_run(tmp_path) as run:
        pid = int(await ok(run, "from ubertool import programs\npy = programs.spawn('python')\n"
                                "py.expect('>>> ')\npy.sendline('import subprocess; "
                                "s = subprocess.Popen([\"sleep\", \"300\"])')\npy.expect('>>> ')\npy.pid"))
        inside = descendants(pid)
        assert len(inside) >= 3  # bwrap's init, python, sleep
    assert not any(alive(p) for p in {pid, *inside})


def test_a_program_outlives_the_thread_that_asked_for_it(tmp_path: Path) -> None:
    """bwrap --die-with-parent fires when the forking *thread* ends; a cell's worker thread does
    (anyio idles them out), so the broker starts children on a thread of its own."""
    specs = {"python": ProgramSpec(argv=(PYTHON, "-i", "-q"), ro_binds=(sys.base_prefix,))}
    with ProgramBroker(specs, tmp_path, recorder=Recorder(), redactor=Redactor()) as broker:
        started: dict[str, int] = {}

        def cell() -> None:  # started, answered, and its thread ends
            started["handle"] = broker.programs_spawn("python")["handle"]
            broker.programs_expect(started["handle"], [">>> "])

        thread = threading.Thread(target=cell)
        thread.start()
        thread.join()
        broker.programs_send(started["handle"], "6 * 7\n")
        assert broker.programs_expect(started["handle"], [">>> "])["before"].strip() == "42"


def test_without_bubblewrap_a_program_is_refused_unless_its_policy_says_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = tmp_path / "bin"
    stub.mkdir()
    monkeypatch.setenv("PATH", f"{stub}:/usr/bin:/bin")
    specs = {"cat": ProgramSpec(argv=("cat",)), "loose": ProgramSpec(argv=("printenv", "HOME"), jail="none")}
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    with ProgramBroker(specs, workspace, recorder=Recorder(), redactor=Redactor()) as broker:
        # A bwrap that cannot make namespaces, as on a host without user namespaces.
        (stub / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                                    "exit 1\n")
        (stub / "bwrap").chmod(stat.S_IRWXU)
        with pytest.raises(ToolFailure) as refusal:
            broker.programs_spawn("cat")
        assert re.fullmatch(
            r"program 'cat' cannot start: bubblewrap \(.*/bin/bwrap\) cannot make a jail here \(bwrap: No "
            r"permissions to create new namespace\): enable user namespaces .*; or an operator sets "
            r'tools.programs.cat.jail = "none" to run it unjailed', str(refusal.value))
        handle = broker.programs_spawn("loose")["handle"]
        home = Path(broker.programs_expect(handle, [r"\S+"])["after"])  # never the guest's workspace
        assert home.name.startswith("ubertool-home-") and home.is_dir() and not any(home.iterdir())
    assert not home.exists()
    (stub / "bwrap").unlink()
    monkeypatch.setenv("PATH", str(stub))
    with (ProgramBroker(specs, workspace, recorder=Recorder(), redactor=Redactor()) as broker,
          pytest.raises(ToolFailure, match=r"bubblewrap is not installed: install bubblewrap "
                                           r"\(Debian: apt-get install bubblewrap\)")):
        broker.programs_spawn("cat")


def test_policy_check_warns_about_an_unjailed_program(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[tools.programs.shell]\nargv = ["sh"]\njail = "none"\n')
    done = subprocess.run([ubertool_command(), "policy", "check", str(policy)], capture_output=True,
                          text=True, timeout=60, env=cli_env())
    assert (done.returncode, done.stdout) == (0, f"{policy}: ok\n")
    assert done.stderr.startswith(f'{policy}: warning: tools.programs.shell.jail = "none": it runs '
                                  "unjailed, as the host user")


def test_read_only_binds_are_checked(tmp_path: Path, _isolated_home: Path) -> None:
    def problems(*binds: str) -> list[str]:
        policy = tmp_path / "policy.toml"
        policy.write_text("".join(f'[tools.programs.p{i}]\nargv = ["cat"]\nro_binds = ["{bind}"]\n'
                                  for i, bind in enumerate(binds)))
        with pytest.raises(PolicyError) as error:
            load_policy(policy)
        return [problem.split(": ", 2)[2] for problem in error.value.problems]

    assert problems("opt", "/", "/tmp", "/home", "/dev/shm", "/workspace/x") == [
        "'opt': an absolute, normalized host path below '/', such as '/opt/tool'",
        "'/': an absolute, normalized host path below '/', such as '/opt/tool'",
        "'/tmp' would cover '/tmp', which the jail makes itself",
        "'/home' would cover '/home/ubertool', which the jail makes itself",
        "'/dev/shm' lies in '/dev', which the jail makes itself",
        "'/workspace/x' lies in '/workspace', which the jail makes itself"]
    assert problems(str(tmp_path / "missing"), str(_isolated_home)) == [
        f"{str(tmp_path / 'missing')!r} does not exist",
        f"{str(_isolated_home)!r} would show the program {str(_isolated_home)!r}, which holds ubertool's "
        "own state"]
