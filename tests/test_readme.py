"""Every fenced block of README.md is run or checked here, so the README cannot drift.

Each block is found by its language and first line (`KEY`s below): a runner takes the block's
text from the README as it is now and runs it (Python in a real sandbox against its own policy
block, with loopback servers standing in for the remote ones it names; commands through the real
`ubertool`). `test_every_readme_block_is_covered` fails on a block no runner and no `SKIPPED`
entry names, so a new block needs a runner or a stated reason. `toml` blocks are all loaded by
`test_policy.py::test_every_toml_block_of_the_readme_is_a_policy_that_checks`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from conftest import VENV_BIN, cli_env, ubertool_command
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from formapp import serve_form, url_of

from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run
from ubertool.sandbox import CellResult, Status

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
UPSTREAM = Path(__file__).with_name("upstream_server.py")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, for messages

    @property
    def key(self) -> tuple[str, str]:
        return self.lang, self.text.strip().splitlines()[0].strip()


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [Block(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", text, re.S | re.M)]


def block(lang: str, first: str) -> Block:
    """The README's block with this language and first line (exactly one)."""
    found = [b for b in readme_blocks() if b.key == (lang, first)]
    assert len(found) == 1, f"README: {len(found)} {lang or 'plain'} blocks start with {first!r}"
    return found[0]


def policy_before(python: Block) -> Block:
    """The toml block right before a Python example: the policy it runs under."""
    blocks = readme_blocks()
    before = blocks[blocks.index(python) - 1]
    assert before.lang == "toml", f"README line {python.line}: no policy block right before it"
    return before


# -- what covers each block ------------------------------------------------------------------

PROGRAMS = ("python", "from ubertool import programs")
BROWSER = ("python", "from ubertool import browser")
UPSTREAM_MCP = ("python", "from ubertool import mcp")
CLIENT_CONFIGS = ("json", "{")  # both start so; each test below takes its own by content
MAKE_SERVE, MAKE_TEST = ("", "make serve"), ("", "make test")
REPLAY = ("", "ubertool replay playbooks/NAME.py [--policy F] [--workspace DIR] [-p NAME=VALUE ...] [--json]")
COMMANDS = ("", 'ubertool run -c "import numpy as np; print(np.arange(6).reshape(2, 3).sum(axis=0))"')
LAYOUT = ("", "ubertool/sandbox/    the WebAssembly jail: SandboxSession, limits, results, restore; "
              "guestlib/ runs in the guest")
CLUSTER = ("", "# one token for the whole cluster: on every node and front end (Ray's token authentication)")
RUN = {PROGRAMS, BROWSER, UPSTREAM_MCP, CLIENT_CONFIGS, MAKE_SERVE, MAKE_TEST, REPLAY, COMMANDS, LAYOUT,
       CLUSTER}

SKIPPED: dict[tuple[str, str], str] = {}  # key -> why no runner can run it (none today)


def test_every_readme_block_is_covered() -> None:
    """A block no runner covers (toml: the policy test) and no skip names fails here."""
    uncovered = [f"README line {b.line}: {b.key}" for b in readme_blocks()
                 if b.lang != "toml" and b.key not in RUN and b.key not in SKIPPED]
    assert uncovered == [], "add a runner to tests/test_readme.py, or a reasoned SKIPPED entry"
    assert {b.lang for b in readme_blocks()} <= {"", "toml", "python", "json"}


# -- Python examples, in a real sandbox under their own policy block -------------------------

async def run_example(python: Block, policy_text: str, folder: Path,
                      urls: dict[str, str] | None = None) -> CellResult:
    """Run the README's Python block as one cell under `policy_text`, each of `urls` (the
    README's) replaced in both by its loopback stand-in; the cell must succeed."""
    code = python.text
    for readme_url, local in (urls or {}).items():
        code, policy_text = code.replace(readme_url, local), policy_text.replace(readme_url, local)
    policy = folder / "policy.toml"
    policy.write_text(policy_text)
    async with open_run(load_policy(policy), workspace=folder / "workspace") as run:
        result = await run.cell(code)
    assert result.status is Status.OK, (python.line, result.error, result.message)
    return result


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("sqlite3") is None or shutil.which("bwrap") is None,
                    reason="needs Debian's sqlite3 and bubblewrap (make test installs them)")
async def test_the_programs_example_runs(tmp_path: Path) -> None:
    example = block(*PROGRAMS)
    db = tmp_path / "workspace" / "db"
    db.mkdir(parents=True)
    with sqlite3.connect(db / "shop.db") as con:  # the user's database the example opens
        con.execute("create table orders(id integer)")
        con.executemany("insert into orders values (?)", [(n,) for n in range(3)])
    con.close()
    result = await run_example(example, policy_before(example).text, tmp_path)
    assert str(result.stdout).strip() == "3"


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
async def test_the_browser_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = block(*BROWSER)
    monkeypatch.setenv("APP_TOKEN", "readme-token-5d1e")
    with serve_form(token="readme-token-5d1e") as app:
        result = await run_example(example, policy_before(example).text, tmp_path,
                                   {"http://127.0.0.1:8080": url_of(app)})
    assert str(result.stdout) == "Hello, Ada! Greeter\n"


@pytest.mark.anyio
async def test_the_upstream_mcp_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python tracker_server.py` from the policy's folder: `python` as a user's PATH finds it."""
    example = block(*UPSTREAM_MCP)
    shutil.copy(UPSTREAM, tmp_path / "tracker_server.py")
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    result = await run_example(example, policy_before(example).text, tmp_path)
    assert result.value is not None and str(result.value) == "3"  # its last line: add(1, 2)


# -- client configurations -------------------------------------------------------------------

def json_blocks() -> list[dict]:
    return [json.loads(b.text) for b in readme_blocks() if b.lang == "json"]


@pytest.mark.anyio
async def test_the_stdio_client_configuration_starts_the_server(tmp_path: Path) -> None:
    """The command and args, with the README's placeholders filled in, serve the one tool."""
    servers = [c["mcpServers"]["ubertool"] for c in json_blocks()]
    (config,) = [c for c in servers if "command" in c]
    command = config["command"].replace("/path/to/ubertool", str(ROOT))
    assert Path(command).is_file(), command
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n")
    args = [a.replace("/path/to/policy.toml", str(policy)) for a in config["args"]]
    async with Client(StdioTransport(command, args, env=cli_env(), keep_alive=False)) as client:
        assert [t.name for t in await client.list_tools()] == ["python"]


@pytest.mark.anyio
async def test_the_http_client_configuration_names_make_serves_url(serve_http: Callable[..., str]) -> None:
    """`make serve` serves on port 8765 at /mcp; the README's URL is that (the test's server,
    on a free port, stands in)."""
    (config,) = [c for c in (c["mcpServers"]["ubertool"] for c in json_blocks()) if "url" in c]
    assert config == {"type": "http", "url": "http://127.0.0.1:8765/mcp"}
    served = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "serve --transport http --host 127.0.0.1 --port 8765" in served.stdout
    url = serve_http()
    assert url.endswith("/mcp")
    async with Client(url) as client:
        assert [t.name for t in await client.list_tools()] == ["python"]


# -- commands --------------------------------------------------------------------------------

def test_the_make_targets_exist_by_dry_run() -> None:
    """`make serve` and `make test` are checked with `make -n`, not run: `make serve` binds the
    fixed port 8765 on a machine other test runs share (the HTTP client test starts the command
    it runs, on a free port), and `make test` installs system packages as root and runs this
    very suite."""
    for key in (MAKE_SERVE, MAKE_TEST):
        (command,) = block(*key).text.strip().splitlines()
        done = subprocess.run([*shlex.split(command), "-n"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout, (command, done.stderr)


def ubertool(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([ubertool_command(), *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=180, env=cli_env())


def command_lines(key: tuple[str, str]) -> dict[str, str]:
    """The block's commands (comments cut) -> their comments."""
    lines = {}
    for line in block(*key).text.strip().splitlines():
        command, _, comment = line.partition("  #")
        lines[command.strip()] = comment.strip()
    return lines


def test_every_command_of_the_command_line_block_runs(tmp_path: Path) -> None:
    """Each line runs as written, its placeholders (`[...]` options, `list|dump|prune`, N,
    policy.toml, job.py) filled in with a real policy and job in a scratch folder."""
    (tmp_path / "policy.toml").write_text("version = 1\n")
    (tmp_path / "job.py").write_text("open('/workspace/answer.txt', 'w').write(str(6 * 7))\n")
    expanded = {
        'ubertool run -c "import numpy as np; print(np.arange(6).reshape(2, 3).sum(axis=0))"':
            [(None, "[3 5 7]\n")],
        "ubertool run job.py --policy policy.toml --workspace ./out": [(None, "")],
        "ubertool shell [--policy policy.toml]": [(["shell", "--policy", "policy.toml"], None)],
        "ubertool warm": [(None, None)],
        "ubertool policy check policy.toml": [(None, None)],
        "ubertool sessions prune [--older-than 30d] [--max-mib N]":
            [(["sessions", "prune", "--older-than", "30d", "--max-mib", "100"], None)],
        "ubertool sessions list|dump|prune --policy policy.toml":
            [(["sessions", verb, "--policy", "policy.toml"], None) for verb in ("list", "prune")],
        "ubertool policy show [--policy policy.toml]":
            [(["policy", "show", "--policy", "policy.toml"], None)],
        "ubertool packages list|sync [--policy policy.toml]":
            [(["packages", verb, "--policy", "policy.toml"], None) for verb in ("list", "sync")],
    }
    assert sorted(command_lines(COMMANDS)) == sorted(expanded), "a command changed: update `expanded`"
    for line, runs in expanded.items():
        for argv, stdout in runs:
            done = ubertool(*(argv or shlex.split(line)[1:]), cwd=tmp_path)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            if stdout is not None:
                assert done.stdout == stdout, line
    assert (tmp_path / "out" / "answer.txt").read_text() == "42"
    # and what the `run` line's comment says of exit codes: 1 failed, 2 usage/policy
    assert ubertool("run", "-c", "1 / 0", cwd=tmp_path).returncode == 1
    assert ubertool("run", "job.py", "--policy", "missing.toml", cwd=tmp_path).returncode == 2


def test_the_replay_synopsis_runs(tmp_path: Path) -> None:
    """Every option the synopsis shows is one `replay` takes, and the second line (a playbook run
    directly, with a parameter) runs the repo's own example playbook."""
    text = block(*REPLAY).text
    help_text = ubertool("replay", "--help", cwd=tmp_path).stdout
    for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", text.split("\n")[0] + text.split("\n")[1]):
        assert option in help_text, option
    direct = text.strip().splitlines()[-1].partition("  #")[0].split()
    assert direct == ["python", "playbooks/NAME.py", "-p", "NAME=VALUE"]
    playbook = ROOT / "playbooks" / "primes.py"
    header = playbook.read_text()
    name = re.search(r"^(\w+) = ", header.split("# %% parameters", 1)[1], re.M)
    assert name is not None, "playbooks/primes.py has no parameter to pass"
    done = subprocess.run([sys.executable, str(playbook), "-p", f"{name[1]}=10"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env=cli_env())
    assert done.returncode == 0, done.stderr


def test_the_layout_names_folders_that_exist() -> None:
    """Each line that starts with a folder (not an indented continuation) names one."""
    folders = [line.split()[0] for line in block(*LAYOUT).text.splitlines() if line[:1].strip()]
    assert len(folders) >= 5
    for folder in folders:
        assert (ROOT / folder).is_dir(), folder


# -- the cluster recipe: its machines are placeholders (HEAD, T, P), so each command is checked
# against its program's own options (click's, hidden ones too: Ray hides `start --memory`);
# tests/test_cluster.py runs a real two-node cluster this way.

_OPTIONS = """import sys, click, importlib
group = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
command = group.commands[sys.argv[3]]
print("\\n".join(o for p in command.params for o in p.opts))"""


def test_the_cluster_recipe_names_real_commands_and_options() -> None:
    lines = [line.split("#")[0].strip() for line in block(*CLUSTER).text.splitlines()]
    checked = 0
    for line in filter(None, lines):
        words = shlex.split(line)
        if words[0] == "export":
            assert words[1:] == ["RAY_AUTH_MODE=token"], line
            assert 'os.environ["RAY_AUTH_MODE"] = "token"' in (ROOT / "tests" / "test_cluster.py").read_text()
            continue
        where = {"ray": ("ray.scripts.scripts", "cli"),
                 "ubertool": ("ubertool.runtime.cli", "main")}[words[0]]
        listed = subprocess.run([sys.executable, "-c", _OPTIONS, *where, words[1]], capture_output=True,
                                text=True, timeout=120, env=cli_env(), check=True).stdout.split()
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert option in listed, f"{line}: {words[0]} {words[1]} has no option {option}"
        checked += 1
    assert checked == 4


# -- every `ubertool ...` a sentence names (README, SECURITY): its commands exist, and so do its
# options (`a|b` is either; `[...]` marks what is optional; capitals are placeholders).

def _inline_commands() -> list[str]:
    text = "".join((ROOT / name).read_text() for name in ("README.md", "SECURITY.md"))
    return sorted(set(re.findall(r"`(ubertool [^`]*)`", text)))


def test_each_inline_ubertool_command_names_real_commands_and_options() -> None:
    from ubertool.runtime.cli import main

    spans = _inline_commands()
    assert len(spans) >= 10
    for span in spans:
        words = span.replace("[", " ").replace("]", " ").split()[1:]
        commands: list[click.Command] = [main]
        while words and isinstance(commands[0], click.Group) and not words[0].startswith("-"):
            names = words.pop(0).split("|")
            found = [group.commands.get(name) for group in commands for name in names]
            assert all(found), f"{span}: no command {'|'.join(names)}"
            commands = [command for command in found if command is not None]
        for option in (w.split("=")[0] for w in words if w.startswith("-") and w != "-"):
            for command in commands:
                assert option in {o for p in command.params for o in p.opts}, f"{span}: no option {option}"
