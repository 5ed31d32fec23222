"""Cells in one real sandbox session: state, echo, errors and every status."""

from __future__ import annotations

import anyio
import pytest
from guest import run_interrupted

from ubertool.sandbox import SandboxSession, Status
from ubertool.sandbox import session as session_module

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _replay_counts_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests count replayed cells: no image for a cell that is merely slow on a busy
    machine (images are tested in test_images.py)."""
    monkeypatch.setattr(session_module, "IMAGE_AFTER_S", 3600.0)


async def test_state_is_kept_across_cells(session: SandboxSession) -> None:
    await session.run("import math\nradius = 2")
    result = await session.run("area = math.pi * radius ** 2\nround(area, 3)")
    assert result.status is Status.OK
    assert str(result.value) == "12.566"
    assert result.cell == 2


async def test_final_expression_is_echoed_but_not_none(session: SandboxSession) -> None:
    assert str((await session.run("[1, 2] + [3]")).value) == "[1, 2, 3]"
    assert (await session.run("None")).value is None
    assert (await session.run("x = 5")).value is None
    assert (await session.run("x", echo=False)).value is None
    assert str((await session.run("_")).value) == "[1, 2, 3]"  # the last echoed value


async def test_a_one_line_cell_means_what_it_means_in_a_longer_one(session: SandboxSession) -> None:
    """One line that is one expression is compiled without a syntax tree: the same outcome."""
    assert str((await session.run("1  # a comment")).value) == "1"
    printed = await session.run("print('p')")
    assert (printed.stdout.head, printed.value) == ("p\n", None)
    assert (await session.run("y = 2")).value is None and str((await session.run("y")).value) == "2"
    indented = await session.run(" 1")
    assert indented.error is not None and indented.error.type == "IndentationError", indented
    failed = await session.run("1 / 0")
    assert failed.error is not None and "<cell-" in failed.error.traceback, failed


async def test_stdout_and_stderr_are_separate(session: SandboxSession) -> None:
    result = await session.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (str(result.stdout), str(result.stderr)) == ("out\n", "err\n")


async def test_error_has_type_message_and_guest_only_traceback(session: SandboxSession) -> None:
    await session.run("def divide(a, b):\n    return a / b")
    result = await session.run("print('before')\ndivide(1, 0)")
    assert result.status is Status.ERROR
    assert str(result.stdout) == "before\n"
    assert result.error is not None
    assert (result.error.type, result.error.message) == ("ZeroDivisionError", "division by zero")
    tb = result.error.traceback
    assert tb.startswith("Traceback (most recent call last):\n")
    assert 'File "<cell-2>", line 2, in <module>' in tb
    assert 'File "<cell-1>", line 2, in divide' in tb and "return a / b" in tb
    assert "_ubertool" not in tb and "/work/" not in tb and "site-packages" not in tb


async def test_syntax_error_names_the_cell_line(session: SandboxSession) -> None:
    result = await session.run("x = 1\ndef f(:\n  pass")
    assert result.status is Status.ERROR
    assert result.error is not None and result.error.type == "SyntaxError"
    assert 'File "<cell-1>", line 2' in result.error.traceback
    assert "ast.py" not in result.error.traceback


async def test_a_failed_cell_keeps_the_session(session: SandboxSession) -> None:
    await session.run("kept = 'yes'")
    assert (await session.run("raise ValueError('boom')")).status is Status.ERROR
    assert str((await session.run("kept")).value) == "'yes'"


async def test_logging_bound_in_one_cell_prints_in_the_next(session: SandboxSession) -> None:
    await session.run("import logging\nlogging.basicConfig(format='%(message)s')")
    result = await session.run("logging.warning('second cell')")
    assert str(result.stderr) == "second cell\n"


async def test_timeout_stops_the_cell_and_keeps_earlier_state(session: SandboxSession) -> None:
    await session.run("total = sum(range(100))")
    await session.run("names = ['a', 'b']")
    await session.run("raise KeyError('not replayed as a success, but replayed')")
    # One long C call: a KeyboardInterrupt cannot stop it, so it is stopped hard and restored.
    result = await session.run("import time\ntime.sleep(100)", timeout_s=0.5)
    assert result.status is Status.TIMEOUT
    assert "time limit of 0.5 s" in result.message
    assert result.restored is not None and result.restored.ok
    assert result.restored.cells == 3
    after = await session.run("total, names")
    assert str(after.value) == "(4950, ['a', 'b'])"
    assert after.cell == 5


async def test_restore_does_not_write_workspace_files_twice(session: SandboxSession) -> None:
    await session.run("open('/workspace/log.txt', 'a').write('one\\n')")
    await session.run("open('/workspace/log.txt', 'a').write('two\\n')")
    result = await session.run("import time\nwhile True: time.sleep(0.01)", timeout_s=0.5)
    assert result.status is Status.TIMEOUT
    assert (session.config.workspace / "log.txt").read_text() == "one\ntwo\n"
    assert str((await session.run("open('/workspace/log.txt').read()")).value) == "'one\\ntwo\\n'"
    assert sorted(p.name for p in session.config.workspace.parent.iterdir()) == ["workspace"]


async def test_memory_status_from_a_large_allocation(session: SandboxSession) -> None:
    await session.run("small = 1")
    result = await session.run("big = bytearray(512 * 2**20)")
    assert result.status is Status.MEMORY
    assert result.error is not None and result.error.type == "MemoryError"
    assert result.restored is None  # a full heap does not end the interpreter
    assert str((await session.run("small")).value) == "1"


async def test_output_flood_keeps_head_and_tail(session: SandboxSession) -> None:
    result = await session.run("for i in range(100_000): print(i)")
    assert result.status is Status.OUTPUT_TRUNCATED
    out = result.stdout
    assert out.head.startswith("0\n1\n2\n")
    assert out.tail.endswith("99998\n99999\n")
    total = sum(len(f"{i}\n") for i in range(100_000))
    assert len(out.head.encode()) + len(out.tail.encode()) == 4096
    assert out.dropped == total - 4096
    assert f"[... {total - 4096} bytes dropped ...]" in str(out)


async def test_a_huge_value_is_cut_in_the_middle(session: SandboxSession) -> None:
    result = await session.run("'a' * 3000 + 'b' * 3000")
    assert result.value is not None and result.value.dropped == 6002 - 4096
    assert result.value.head.startswith("'aaa") and result.value.tail.endswith("bbb'")


async def test_interrupt_cancels_the_cell_and_restores(session: SandboxSession) -> None:
    await session.run("before = 'still here'")
    result = await run_interrupted(session, "import time\ntime.sleep(100)")
    assert result.status is Status.CANCELLED
    assert result.restored is not None and result.restored.cells == 1
    assert str((await session.run("before")).value) == "'still here'"


async def test_cancelling_the_caller_stops_the_cell(session: SandboxSession) -> None:
    await session.run("before = 41")
    with anyio.move_on_after(0.3):
        await session.run("import time\ntime.sleep(100)", timeout_s=20)
    assert session.last_restore is not None and session.last_restore.cells == 1
    assert str((await session.run("before + 1")).value) == "42"


async def test_code_over_the_cap_is_denied_without_running(make_config) -> None:
    async with SandboxSession(make_config(code_bytes=1024)) as s:
        result = await s.run("x = 1\n" + "#" * 2000)
        assert result.status is Status.DENIED
        assert "over the policy's cap of 1024 bytes" in result.message
        assert (await s.run("x")).status is Status.ERROR  # it never ran


async def test_os_exit_is_a_crash_and_the_session_recovers(session: SandboxSession) -> None:
    await session.run("a = [1, 2, 3]")
    result = await session.run("import os\nos._exit(3)")
    assert result.status is Status.CRASHED
    assert "os._exit()" in result.message
    assert result.restored is not None and result.restored.cells == 1
    assert str((await session.run("a")).value) == "[1, 2, 3]"


async def test_exit_is_a_crash_not_replayed(session: SandboxSession) -> None:
    await session.run("a = 1")
    result = await session.run("exit(2)")
    assert result.status is Status.CRASHED and "exit() or quit()" in result.message
    assert str((await session.run("a")).value) == "1"
    assert (await session.run("b = a + 1")).status is Status.OK


async def test_cells_run_one_at_a_time_in_order(session: SandboxSession) -> None:
    await session.run("seen = []")
    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(session.run, f"import time\ntime.sleep(0.02)\nseen.append({n})")
            await anyio.sleep(0.005)
    assert str((await session.run("seen")).value) == "[0, 1, 2, 3, 4]"


async def test_restore_that_diverges_says_so(make_config) -> None:
    config = make_config()
    (config.workspace / "early.txt").write_text("early")  # there when the session begins
    async with SandboxSession(config) as session:
        await session.run("kept = 'before the divergence'")
        assert (await session.run("early = open('/workspace/early.txt').read()")).status is Status.OK
        await session.run("after = 1")
        # The host removes it after the cell read it: the replay does not find it.
        (config.workspace / "early.txt").unlink()
        result = await session.run("import time\ntime.sleep(100)", timeout_s=0.3)
        report = result.restored
        assert report is not None and not report.ok
        assert (report.cells, report.failed_at) == (1, 2)
        assert report.reason == "cell 2 ended 'error' on replay, not 'ok' as it first did"
        assert str((await session.run("kept")).value) == "'before the divergence'"
        assert (await session.run("after")).status is Status.ERROR


async def test_open_figures_come_back_as_png_images(session: SandboxSession) -> None:
    result = await session.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\n"
                               "plt.figure()\nplt.bar(['a', 'b'], [3, 5])\nplt.show()")
    assert result.status is Status.OK, result.error
    assert len(result.images) == 2
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in result.images)
    assert str(result.stderr) == ""  # no warning about a non-interactive backend
    assert (await session.run("plt.get_fignums()")).value is not None
    assert (await session.run("1")).images == ()  # shown once, then closed


async def test_the_guest_helper_describes_the_sandbox(make_config) -> None:
    from dataclasses import replace

    config = replace(make_config(), about="Folders: /workspace (writable).")
    async with SandboxSession(config) as s:
        result = await s.run("import ubertool\nubertool.about()")
        assert str(result.stdout) == "Folders: /workspace (writable).\n"


async def test_workspace_quota_refuses_the_cell_that_passes_it(make_config) -> None:
    async with SandboxSession(make_config(workspace_bytes=10_000)) as s:
        assert (await s.run("open('/workspace/small', 'wb').write(b'x' * 5000)")).status is Status.OK
        over = await s.run("open('/workspace/big', 'wb').write(b'x' * 8000)")
        assert over.status is Status.DENIED
        assert over.message == ("the cell wrote past the workspace quota of 10000 bytes (the workspace and "
                                "/tmp together) and was stopped; it emptied /workspace/big. Delete files to "
                                "make room")
        sizes = await s.run("import os\nos.path.getsize('/workspace/small'), "
                            "os.path.getsize('/workspace/big')")
        assert str(sizes.value) == "(5000, 0)"  # what fit before stays; what passed it is emptied


async def test_open_files_are_capped_per_session(make_config) -> None:
    async with SandboxSession(make_config(open_files=40)) as s:
        result = await s.run("fs = [open(f'/workspace/f{i}', 'w') for i in range(100)]")
        assert result.error is not None and result.error.type == "OSError"
        assert "No file descriptors available" in result.error.message
        again = await s.run("import gc\ngc.collect()\nopen('/workspace/again', 'w').close()")
        assert again.status is Status.OK  # the leaked files were closed: the session goes on
