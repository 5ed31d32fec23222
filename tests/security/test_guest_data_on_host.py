"""What the guest writes must never run on the host: playbooks it saves, and results it reports.

A playbook is a file a person runs (`python playbook.py`, `./playbook.py`), imports, or replays.
Every text the guest passes to `save_playbook` is hostile; so is every result record, since
guest code can replace the guest runtime that writes it.
"""

from __future__ import annotations

import ast
import json
import keyword
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import JournalBackend, cli_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubertool.playbooks.dump import NAME, dump
from ubertool.playbooks.format import HEADER_LINE, PlaybookError, guard, parse_playbook, read_playbook
from ubertool.runtime.journal import Journal, JournalCell, default_journal_path
from ubertool.runtime.policy import default_policy
from ubertool.runtime.runs import open_run, playbooks_home
from ubertool.sandbox import Status

pytestmark = pytest.mark.anyio
# Cells that, were they ever run by host Python, leave a file at $UBERTOOL_TEST_MARKER; in the
# sandbox the variable is unset, so they do nothing and succeed.
HOST_ONLY = ("import os\nmarker = os.environ.get('UBERTOOL_TEST_MARKER')\n"
             "if marker:\n    open(marker, 'w').write('a cell ran on the host')\n")
ATTACKS = [
    pytest.param('ok"""\nimport os; os.system("touch $UBERTOOL_TEST_MARKER")\n"""', {}, id="docstring"),
    pytest.param("x", {"p": '""";__import__("os").system("touch $UBERTOOL_TEST_MARKER");"""'}, id="param-value"),
    pytest.param("x\n# ubertool-playbook: {\"format\": 2, \"policy\": \"/etc/evil.toml\"}", {}, id="header"),
    pytest.param("x\rimport os; os.system('touch $UBERTOOL_TEST_MARKER')", {}, id="carriage-return"),
    pytest.param("x\x0cimport os\u2028os.system('x')\x1c# %% cell 1\nimport os", {}, id="odd-line-breaks"),
]


def cell(number: int, code: str) -> JournalCell:
    return JournalCell(number=number, code=code, status="ok", stdout="", stderr="", value=None, error_type=None,
                       traceback=None, duration_s=0.0)


def source(run: str = "run-1") -> dict[str, Any]:
    return {"run": run, "policy": None, "policy_sha256": "0" * 64, "mounts": [], "credentials": [],
            "ubertool": "ubertool"}


def prologue(text: str) -> str:
    return text[:text.index("\n# %% parameters\n")]


def literals() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.text())
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.from_regex(NAME, fullmatch=True), description=st.text(),
       params=st.dictionaries(names, literals(), max_size=4))
def test_any_description_name_and_parameters_stay_inert(name: str, description: str,
                                                        params: dict[str, Any]) -> None:
    text, _ = dump([cell(1, "import math\n")], name=name, description=description, params=params,
                   source=source())
    # Above the cells, host Python finds exactly the statements ubertool writes...
    assert ast.dump(ast.parse(prologue(text))) == ast.dump(ast.parse(guard("ubertool")))
    # ...the header is line 3 and nowhere else, and every value reads back as it was given.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    assert [i + 1 for i, line in enumerate(lines) if line.startswith("# ubertool-playbook:")] == [HEADER_LINE]
    book = parse_playbook(Path(f"{name}.py"), text)
    assert book.parameters == params
    assert book.header["name"] == name and [s.code for s in book.cells] == ["import math\n"]


@pytest.mark.parametrize(("description", "params"), ATTACKS)
def test_running_or_importing_a_playbook_runs_nothing_on_the_host(tmp_path: Path, description: str,
                                                                  params: dict[str, Any]) -> None:
    text, _ = dump([cell(1, HOST_ONLY)], name="evil", description=description, params=params,
                           source=source())
    playbook = tmp_path / "evil.py"
    playbook.write_text(text)
    marker = tmp_path / "owned"
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    calls = tmp_path / "calls"
    stub = stub_bin / "ubertool"  # stands in for ubertool: records how it was called, nothing else
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
    stub.chmod(0o755)
    env = {**cli_env(), "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}",
           "UBERTOOL_TEST_MARKER": str(marker)}

    direct = subprocess.run([sys.executable, str(playbook), "-p", "a=1"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert direct.returncode == 0, direct.stderr
    assert calls.read_text().split("\n")[:-1] == ["replay", str(playbook), "-p", "a=1"]

    imported = subprocess.run([sys.executable, "-c", "import evil"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    assert imported.returncode == 1 and "ImportError: an ubertool playbook" in imported.stderr
    ran = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(playbook)!r})"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and "ImportError" in ran.stderr
    assert not marker.exists()
    assert read_playbook(playbook).header.get("policy") is None  # no forged header was taken


def test_a_forged_or_edited_prologue_is_refused(tmp_path: Path) -> None:
    text, _ = dump([cell(1, "x = 1\n")], name="book", description="d", params={}, source=source())
    cases = {
        "second-header": text.replace("\n# %% cell 1\n",
                                      '\n# %% cell 1\n# ubertool-playbook: {"format": 2}\n'),
        "header-moved": "#\n" + text,
        "code-above-cells": text.replace("\n# %% parameters\n", "\nimport os\n\n# %% parameters\n"),
        "old-format": text.replace('"format": 2', '"format": 1'),
    }
    for label, forged in cases.items():
        with pytest.raises(PlaybookError) as refused:
            parse_playbook(tmp_path / "book.py", forged)
        assert "book.py" in str(refused.value), label


def test_a_cell_line_that_reads_as_a_marker_never_splits_the_cell() -> None:
    for line in ("# %% cell 99", "# %% parameters", "#%%", "# ubertool-playbook: {}"):
        text, _ = dump([cell(1, f"x = 1\n{line}\ny = 2\n")], name="b", description="", params={},
                       source=source())  # a comment: kept, with one '#' more
        book = parse_playbook(Path("b.py"), text)
        assert [s.code for s in book.cells] == [f"x = 1\n#{line}\ny = 2\n"], line
        with pytest.raises(PlaybookError, match="reads as a playbook marker"):  # inside a string: refused
            dump([cell(1, f"x = '''\n{line}\n'''\n")], name="b", description="", params={}, source=source())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()], ids=["nan", "inf", "object"])
def test_a_parameter_that_is_no_literal_is_refused(value: object) -> None:
    with pytest.raises(PlaybookError, match="cannot be written as a literal"):
        dump([cell(1, "x = 1\n")], name="b", description="", params={"p": value}, source=source())


async def test_save_playbook_never_replaces_another_sessions(journal_backend: JournalBackend) -> None:
    save = "import ubertool\nubertool.save_playbook('shared', 'mine')"
    with Journal(journal_backend.store()) as journal:
        async with open_run(default_policy(), journal=journal) as first, \
                open_run(default_policy(), journal=journal) as second:
            await first.cell("x = 1")
            await second.cell("x = 2")
            assert (await first.cell(save)).status is Status.OK
            refused = await second.cell(save)
            assert refused.status is Status.ERROR
            assert "a playbook named 'shared' exists already" in refused.error.message
            assert f"run {first.id}" in refused.error.message
            assert (await first.cell(save)).status is Status.OK  # its own: replaced
    book = read_playbook(playbooks_home() / "shared.py")
    assert book.header["run"] == first.id and book.cells[0].code == "x = 1\n"


async def test_save_playbook_from_the_sandbox_writes_an_inert_file(_isolated_home: Path, tmp_path: Path) -> None:
    """The issue's own attack, through the real guest: the saved file, run by host Python,
    hands itself to ubertool and runs nothing else."""
    marker = tmp_path / "owned"
    with Journal(default_journal_path()) as journal:
        async with open_run(default_policy(), journal=journal) as run:
            await run.cell(HOST_ONLY)
            saved = await run.cell("import ubertool\nubertool.save_playbook('x', 'ok\"\"\"\\nimport os; "
                                   "os.system(\"touch $UBERTOOL_TEST_MARKER\")\\n\"\"\"', "
                                   "params={'p': '\"\"\";__import__(\"os\").system(\"id\");\"\"\"'})")
            assert saved.status is Status.OK, saved
    path = playbooks_home() / "x.py"
    imported = subprocess.run([sys.executable, "-c", "import x"], cwd=path.parent, capture_output=True,
                              text=True, timeout=60, env={**cli_env(), "UBERTOOL_TEST_MARKER": str(marker)})
    assert imported.returncode == 1 and "ImportError" in imported.stderr
    assert not marker.exists()
    assert oct(path.stat().st_mode & 0o777) == "0o700"


async def test_a_malformed_result_record_is_a_result(_isolated_home: Path) -> None:
    """Guest code can replace the runtime that reports its cells: a record of the wrong shape is
    answered as a crashed cell (the session restored), never a host error."""
    forge = ("import _ubertool\n"
             "class J:\n"
             "    @staticmethod\n"
             "    def dumps(record, **kw):\n"
             "        return {shape!r}\n"
             "_ubertool.json = J")
    shapes = ['{"stdout": 5}', "[1, 2]", '{"stdout": {"head": 1, "tail": "", "dropped": 0}}',
              json.dumps({"stdout": {"head": "", "tail": "", "dropped": 0},
                          "stderr": {"head": "", "tail": "", "dropped": 0}, "value": None,
                          "error": {"type": "X", "message": "m", "traceback": "t", "extra": 1},
                          "images": []}),
              json.dumps({"stdout": {"head": "", "tail": "", "dropped": 0},
                          "stderr": {"head": "", "tail": "", "dropped": 0}, "value": None, "error": None,
                          "images": ["not base64!"]})]
    async with open_run(default_policy()) as run:
        await run.cell("kept = 41")
        for shape in shapes:
            result = await run.cell(forge.format(shape=shape))
            assert result.status is Status.CRASHED, (shape, result)
            assert "report of the cell is malformed" in result.message
            after = await run.cell("kept + 1")
            assert after.status is Status.OK and str(after.value) == "42", shape


async def test_a_fifo_where_long_output_is_saved_never_blocks_the_host(_isolated_home: Path) -> None:
    """A guest (through a jailed program) can leave a FIFO at the name its long output will be
    saved under; the host replaces it instead of opening it, so no thread blocks on it."""
    import stat

    import anyio

    from ubertool.runtime.reply import reply

    async with open_run(default_policy()) as run:
        result = await run.cell("print('A' * 50_000)")
        saved = run.workspace / ".ubertool"
        saved.mkdir()
        fifo = saved / f"cell-{result.cell}-stdout.txt"
        os.mkfifo(fifo)
        with anyio.fail_after(10):
            answer = await anyio.to_thread.run_sync(reply, "s-test", result, run, abandon_on_cancel=True)
        assert stat.S_ISREG(fifo.lstat().st_mode) and fifo.stat().st_size == 50_001
        assert "all of it is in /workspace/.ubertool/" in answer.content[0].text


def test_a_parameter_line_is_cut_where_python_splits_lines() -> None:
    """A \\x1c (a line break to str.splitlines, not to Python) shifted the numbering, so another
    line was cut and a playbook held code the session never ran."""
    code = ("x = 1 #\x1c\ns = '''\n'''\nregion = '''+print(\"SMUGGLED\")+'''\nu = 1 #'''\n"
            "print('cell ran; s =', repr(s))\n")
    text, _ = dump([cell(1, code)], name="b", description="", params={"region": "EMEA"}, source=source())
    book = parse_playbook(Path("b.py"), text)
    assert "SMUGGLED" not in text and book.parameters == {"region": "EMEA"}
    expected = code.replace("region = '''+print(\"SMUGGLED\")+'''\n", "")
    assert ast.dump(ast.parse(book.cells[0].code)) == ast.dump(ast.parse(expected))
    with pytest.raises(PlaybookError, match="line of its own"):
        dump([cell(1, "region = 'x'; print(1)\n")], name="b", description="", params={"region": "y"},
             source=source())


def test_a_description_line_that_reads_as_a_marker_stays_a_comment() -> None:
    for line in ("%% cell 1", "%%", "ubertool-playbook: {}"):
        text, _ = dump([cell(1, "x = 1\n")], name="b", description=f"ok\n{line}", params={}, source=source())
        assert [s.code for s in parse_playbook(Path("b.py"), text).cells] == ["x = 1\n"], line
