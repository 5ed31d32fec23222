"""Session images: exact rollback after a hard stop, open files across it, soft interrupts, and
the fallback to replay when the private layer's self-test fails. Real sandbox throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from guest import run_interrupted

from ubertool.sandbox import ProviderMount, SandboxConfig, SandboxSession, Status, images
from ubertool.sandbox import session as session_module
from ubertool.tools.mounts import Entry

pytestmark = pytest.mark.anyio

SLEEP = "import time\ntime.sleep(100)"  # one C call: only the hard stop ends it


@pytest.fixture(autouse=True)
def _images_checked() -> None:
    """Every test here needs the private layer on (its self-test passed)."""
    assert images.check() == "", images.check()


async def _image_now(session: SandboxSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next completed cell keep an image, whatever it costs to replay."""
    monkeypatch.setattr(session_module, "IMAGE_AFTER_S", -1.0)


async def _stopped_and_back_from_the_image(session: SandboxSession, probe: str, expected: str) -> None:
    """A hard stop, then the session exactly as the image holds it: nothing replayed."""
    result = await session.run(SLEEP, timeout_s=1.0)
    assert result.restored is not None and result.restored.ok and result.restored.cells == 0
    assert str((await session.run(probe)).value) == expected


async def test_state_survives_a_hard_stop_exactly(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _image_now(session, monkeypatch)
    setup = (
        "import random, pandas as pd\n"
        "r = random.random()\n"
        "df = pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})\n"
        "def twice(v):\n    return 2 * v\n"
        "counter = [0]"
    )
    assert (await session.run(setup)).status is Status.OK
    before = str((await session.run("repr(r), df.to_json(), twice(21)")).value)
    result = await session.run(SLEEP, timeout_s=1.0)
    assert result.status is Status.TIMEOUT
    assert result.restored is not None and result.restored.ok
    assert result.restored.cells == 0  # from the image: nothing replayed
    after = await session.run("repr(r), df.to_json(), twice(21)")
    assert str(after.value) == before  # the unseeded random value too: replay would change it
    # New imports and new values still work in the restored interpreter.
    assert str((await session.run("import json\njson.dumps(random.random() != r)")).value) == "'true'"


async def test_a_session_takes_each_image_into_its_last_one_and_restores_the_newest(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One buffer per session: an image copied over the last one (5x cheaper than new memory),
    never a stale mix of the two."""
    await _image_now(session, monkeypatch)
    await session.run("import random\nvalues = [random.random()]")
    first = session._base.image
    assert first is not None
    for _ in range(3):
        await session.run("values.append(random.random())")
    assert session._base.image is not None and session._base.image.memory is first.memory
    expected = str((await session.run("repr(values)")).value)
    await _stopped_and_back_from_the_image(session, "repr(values)", expected)


async def test_a_resting_session_holds_its_image_compressed_and_restores_it_exactly(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _image_now(session, monkeypatch)
    await session.run("import random\nvalues = [random.random() for _ in range(5)]")
    expected = str((await session.run("repr(values)")).value)
    held = session.host_bytes
    freed = await session.rest()
    assert freed > 10 * 2**20 and session.host_bytes == held - freed
    assert await session.rest() == 0  # once
    saved = await session.save()  # reads the image whole
    assert saved.image is not None and len(saved.image) > freed
    await session.rest()
    await _stopped_and_back_from_the_image(session, "repr(values)", expected)


async def test_cells_after_the_image_are_replayed(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _image_now(session, monkeypatch)
    await session.run("import random\nr = random.random()")
    monkeypatch.setattr(session_module, "IMAGE_AFTER_S", 3600.0)  # no more images
    await session.run("items = [1]")
    await session.run("items.append(2)")
    before = str((await session.run("repr(r)")).value)
    result = await session.run(SLEEP, timeout_s=1.0)
    assert result.restored is not None and result.restored.ok
    assert result.restored.cells == 3  # the three cells after the image
    assert str((await session.run("repr(r), items")).value) == f"({before}, [1, 2])"


async def test_read_and_write_handles_survive_a_hard_stop(session: SandboxSession) -> None:
    workspace = session.config.workspace
    (workspace / "in.txt").write_text("line1\nline2\nline3\n")
    opened = await session.run(
        "src = open('/workspace/in.txt')\nfirst = src.readline()\n"
        "out = open('/workspace/out.txt', 'w')\nout.write('a'); out.flush()\n"
        "tmp = open('/tmp/scratch', 'w+')\ntmp.write('t1'); tmp.flush()\n"
        "(src.fileno(), out.fileno(), tmp.fileno())"
    )
    assert opened.status is Status.OK
    result = await session.run(SLEEP, timeout_s=1.0)
    assert result.status is Status.TIMEOUT and result.restored is not None and result.restored.ok
    after = await session.run(
        "numbers = (src.fileno(), out.fileno(), tmp.fileno())\n"
        "second = src.readline()\nout.write('b'); out.flush()\n"
        "tmp.seek(0); scratch = tmp.read()\n"
        "fresh = open('/workspace/new.txt', 'w'); fresh.write('n'); fresh.close()\n"
        "numbers, first, second, scratch"
    )
    assert after.status is Status.OK, after
    assert str(after.value) == f"({opened.value}, 'line1\\n', 'line2\\n', 't1')"
    # The lost-write bug: the handle writes to the real file, not to a set-aside copy.
    assert (workspace / "out.txt").read_text() == "ab"
    assert (workspace / "new.txt").read_text() == "n"


async def test_lost_write_bug_with_cells_after_the_handle(session: SandboxSession) -> None:
    """A handle opened before a hard stop, with cheap cells after it that are replayed."""
    workspace = session.config.workspace
    await session.run("log = open('/workspace/log.txt', 'a')\nlog.write('a'); log.flush()")
    await session.run("x = 1")  # replayed: it does not touch the handle
    assert (await session.run(SLEEP, timeout_s=1.0)).status is Status.TIMEOUT
    result = await session.run("log.write('b'); log.flush(); x")
    assert result.status is Status.OK and str(result.value) == "1"
    assert (workspace / "log.txt").read_text() == "ab"
    assert (await session.run("log.close()")).status is Status.OK
    assert (workspace / "log.txt").read_text() == "ab"


async def test_a_vanished_file_keeps_its_number(session: SandboxSession) -> None:
    workspace = session.config.workspace
    opened = await session.run("gone = open('/workspace/gone.txt', 'w')\ngone.fileno()")
    (workspace / "gone.txt").unlink()
    result = await session.run(SLEEP, timeout_s=1.0)
    assert result.restored is not None and "gone.txt" in result.restored.reason
    after = await session.run(
        "other = open('/workspace/other.txt', 'w')\n"
        "try:\n    gone.write('x'); gone.flush(); wrote = True\nexcept OSError:\n    wrote = False\n"
        "other.fileno() != gone.fileno(), wrote"
    )
    assert str(after.value) == "(True, False)", (opened, after)


async def test_a_restore_from_an_image_can_be_restored_again(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _image_now(session, monkeypatch)
    await session.run("import random\nr = random.random()")
    before = str((await session.run("repr(r)")).value)
    for _ in range(2):
        assert (await session.run(SLEEP, timeout_s=0.5)).restored is not None
        await session.run("extra = r * 2")
    assert str((await session.run("repr(r), extra == r * 2")).value) == f"({before}, True)"


async def test_fallback_to_replay_when_the_self_test_fails(
    make_config: Callable[..., SandboxConfig], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(images, "_checked", None)  # run the self-test again, made to fail
    monkeypatch.setenv(images.FORCE_FAIL_ENV, "fail")
    async with SandboxSession(make_config()) as session:
        about = await session.run("import ubertool\nubertool.about()")
        assert "session images are off" in str(about.stdout)
        await session.run("import random\nr = random.random()\nkept = 7")
        before = str((await session.run("repr(r)")).value)
        result = await session.run(SLEEP, timeout_s=0.5)
        assert result.restored is not None and result.restored.ok
        assert result.restored.cells == 3  # every completed cell replayed, none from an image
        after = await session.run("repr(r), kept")
        assert str(after.value) != f"({before}, 7)" and str(after.value).endswith(", 7)")
    assert sum("session images are off" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(images, "_checked", None)  # the next test checks again, for real


async def test_the_private_root_lives_as_long_as_its_session(
    make_config: Callable[..., SandboxConfig],
) -> None:
    async with SandboxSession(make_config()) as session:
        await session.run("open('/tmp/kept', 'w').write('k')\nimport os\nhome = os.environ['HOME']")
        root = session._root
        assert root is not None and (root / "tmp" / "kept").read_text() == "k"
        await session.run(SLEEP, timeout_s=0.5)
        after = await session.run("open('/tmp/kept').read(), os.path.isdir(home)")
        assert str(after.value) == "('k', True)"
    assert not root.exists()


async def test_soft_interrupt_stops_a_python_loop_and_keeps_the_interpreter(
    session: SandboxSession,
) -> None:
    await session.run("import random\nr = random.random()\nn = 0")
    before = str((await session.run("repr(r)")).value)
    result = await session.run("while True:\n    n += 1", timeout_s=0.5)
    assert result.status is Status.TIMEOUT
    assert result.restored is None  # no rollback: the interpreter kept going
    assert "KeyboardInterrupt stopped it and the interpreter kept its state" in result.message
    assert result.error is not None and result.error.type == "KeyboardInterrupt"
    after = await session.run("repr(r), n > 0")
    assert str(after.value) == f"({before}, True)"  # the loop's own work is kept too
    # That partial work survives a later hard stop: it became the base of the next restore.
    hard = await session.run(SLEEP, timeout_s=0.5)
    assert hard.restored is not None and hard.restored.ok
    assert str((await session.run("repr(r), n > 0")).value) == f"({before}, True)"


async def test_soft_interrupt_stops_a_numpy_loop(session: SandboxSession) -> None:
    await session.run("import numpy as np\nkept = np.arange(3)")
    result = await session.run("while True:\n    total = np.ones(10_000).sum()", timeout_s=0.5)
    assert result.status is Status.TIMEOUT and result.restored is None
    assert str((await session.run("kept.tolist(), total")).value) == "([0, 1, 2], np.float64(10000.0))"


async def test_interrupt_is_soft_first(session: SandboxSession) -> None:
    await session.run("before = 'kept'")
    result = await run_interrupted(session, "while True: pass")
    assert result.status is Status.CANCELLED and result.restored is None
    assert "interrupted; a KeyboardInterrupt stopped it" in result.message
    assert str((await session.run("before")).value) == "'kept'"


async def test_a_sleep_needs_the_hard_stop(session: SandboxSession) -> None:
    await session.run("kept = 1")
    result = await session.run(SLEEP, timeout_s=0.5)
    assert result.status is Status.TIMEOUT
    assert result.message == "the cell ran past its time limit of 0.5 s and was stopped"
    assert any("KeyboardInterrupt did not stop the cell within" in note for note in result.notes)
    assert result.restored is not None and result.restored.ok
    assert str((await session.run("kept")).value) == "1"


async def test_code_that_swallows_the_interrupt_is_stopped_hard(session: SandboxSession) -> None:
    await session.run("kept = 2")
    stubborn = "while True:\n    try:\n        while True: pass\n    except KeyboardInterrupt:\n        pass"
    result = await session.run(stubborn, timeout_s=0.5)
    assert result.status is Status.TIMEOUT and result.restored is not None
    assert str((await session.run("kept")).value) == "2"


class _Files:
    """A writable provider keeping its files in a dict (ubertool's provider interface)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def stat(self, path: str) -> Entry:
        if path == "/":
            return Entry("dir")
        if path not in self.files:
            raise FileNotFoundError(path)
        return Entry("file", len(self.files[path]))

    def list(self, path: str) -> list[tuple[str, str]]:
        return [(name.lstrip("/"), "file") for name in self.files]

    def read(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def write(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def remove(self, path: str) -> None:
        self.files.pop(path)

    def mkdir(self, path: str) -> None:
        raise PermissionError(path)

    rmdir = mkdir

    def rename(self, src: str, dst: str) -> None:
        self.files[dst] = self.files.pop(src)

    def flush(self) -> None:
        pass


async def test_mount_handles_survive_a_hard_stop(make_config: Callable[..., SandboxConfig]) -> None:
    provider = _Files({"/in.txt": b"one\ntwo\n"})
    config = replace(make_config(), mounts=(ProviderMount("/data", provider, writable=True),))
    async with SandboxSession(config) as session:
        opened = await session.run(
            "src = open('/data/in.txt')\nfirst = src.readline()\n"
            "out = open('/data/out.txt', 'w')\nout.write('a'); out.flush()\n"
            "(src.fileno(), out.fileno())"
        )
        assert opened.status is Status.OK, opened
        result = await session.run(SLEEP, timeout_s=0.5)
        assert result.restored is not None and result.restored.ok
        after = await session.run(
            "numbers = (src.fileno(), out.fileno())\nsecond = src.readline()\n"
            "out.write('b'); out.close()\nnumbers, first, second"
        )
        assert str(after.value) == f"({opened.value}, 'one\\n', 'two\\n')", after
        assert provider.files["/out.txt"] == b"ab"


async def test_sessions_from_a_template_are_warm_and_reseeded(
    make_config: Callable[..., SandboxConfig],
) -> None:
    config = replace(make_config(), template=("numpy", "pandas"))
    probe = ("import sys, random, numpy as np\n"
             "('pandas' in sys.modules, repr(random.random()), repr(np.random.random()))")
    values = []
    for _ in range(2):
        async with SandboxSession(config) as session:
            first = await session.run(probe)
            assert first.status is Status.OK, first
            values.append(str(first.value))
            # A hard stop with no later image goes back to the template and replays.
            await session.run("import pandas as pd\nframe = pd.DataFrame({'a': [1]})")
            stopped = await session.run(SLEEP, timeout_s=0.5)
            assert stopped.restored is not None and stopped.restored.ok
            assert str((await session.run("frame.a.sum()")).value) == "np.int64(1)"
    assert all(value.startswith("(True, ") for value in values)
    assert values[0] != values[1]  # each session got its own random streams


async def test_a_cell_that_wrote_a_file_is_never_replayed(
    session: SandboxSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that existed at the image stays in place during a replay, so a replayed append
    would land twice: a cell that changes the writable folders is imaged instead."""
    await _image_now(session, monkeypatch)
    await session.run("open('/workspace/log.txt', 'a').write('one\\n')")  # imaged
    monkeypatch.setattr(session_module, "IMAGE_AFTER_S", 3600.0)  # only the file rule now
    await session.run("open('/workspace/log.txt', 'a').write('two\\n')")
    result = await session.run(SLEEP, timeout_s=0.5)
    assert (session.config.workspace / "log.txt").read_text() == "one\ntwo\n"
    assert result.restored is not None and result.restored.ok and result.restored.cells == 0


async def test_a_deep_tree_in_the_private_root_is_walked_and_removed(
    make_config: Callable[..., SandboxConfig],
) -> None:
    """The guest shapes /tmp: the host walks it (for images) and removes it without recursion."""
    async with SandboxSession(make_config()) as session:
        deep = await session.run("import os\nos.chdir('/tmp')\n"
                                 "for _ in range(1500):\n    os.mkdir('d'); os.chdir('d')\nos.chdir('/')")
        assert deep.status is Status.OK, deep
        assert (await session.run("kept = 1")).status is Status.OK
        assert (await session.run(SLEEP, timeout_s=0.5)).restored is not None
        assert str((await session.run("kept")).value) == "1"
        root = session._root
    assert root is not None and not root.exists()


async def test_the_policy_names_a_template(_isolated_home: Path, tmp_path: Path) -> None:
    from ubertool.runtime.policy import load_policy
    from ubertool.runtime.runs import open_run

    policy = tmp_path / "policy.toml"
    policy.write_text("[sessions]\ntemplate = ['numpy', 'json']\n")
    values = []
    for _ in range(2):
        async with open_run(load_policy(policy)) as run:
            first = await run.cell("import sys, random\n('numpy' in sys.modules, random.random())")
            ready, value = eval(str(first.value))
            assert ready, first
            values.append(value)
    assert values[0] != values[1]  # reseeded, not the template's random state


async def test_a_replay_run_takes_no_image_and_still_stops_a_cell_softly(_isolated_home: Path) -> None:
    """A playbook's replay ends at its first failed cell, so images after slow cells are never
    used: it takes none (a run does); a soft interrupt still stops a loop, as anywhere."""
    from ubertool.runtime.policy import default_policy
    from ubertool.runtime.runs import open_run

    slow = "import time\nstarted = time.monotonic()\nwhile time.monotonic() - started < 0.2: pass"
    for kind, imaged in (("run", True), ("replay", False)):
        async with open_run(default_policy(), kind=kind) as run:
            assert (await run.cell(slow)).status is Status.OK
            assert (run.session._base.cells > 0) is imaged, kind
            stopped = await run.cell("while True: pass", timeout_s=0.3)
            assert stopped.status is Status.TIMEOUT and "KeyboardInterrupt" in stopped.message, stopped


def test_the_soft_interrupt_self_test_sends_only_once_the_guest_loops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded host the guest's turn starts late: an interrupt sent before its loop lands in
    the turn's own setup, and the self-test would turn soft interrupts off for the process."""
    opened = images._open_bare

    def slow_to_start(root: str) -> Any:
        interp = opened(root)
        run = interp.run

        def late(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)  # the guest is not looping yet; its interpreter is there to write to
            return run(*args, **kwargs)

        interp.run = late
        return interp

    monkeypatch.setattr(images, "_open_bare", slow_to_start)
    addr = images.soft_check()[0]
    assert addr is not None
    assert images._live_interrupt(addr) is addr  # raises when the interrupt came too soon


def _soft_check_in_a_new_process(cache: Path) -> str:
    """`soft_check()`'s answer in a fresh process whose cache folder is `cache`: '' when soft
    interrupts are on, else why not."""
    code = "from ubertool.sandbox import images; print(images.check() or images.soft_check()[1])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "UBERTOOL_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_soft_interrupt_addresses_are_kept_per_module_and_still_checked_live(tmp_path: Path) -> None:
    assert _soft_check_in_a_new_process(tmp_path) == ""
    [kept] = (tmp_path / "sandbox").iterdir()
    found = json.loads(kept.read_text())
    assert len(found) == 5 and kept.stat().st_mode & 0o077 == 0
    assert _soft_check_in_a_new_process(tmp_path) == ""  # from the kept file
    # A kept file that is not five words with one bit is found again from the module.
    kept.write_text(json.dumps([*found[:3], 3, found[4]]))
    assert _soft_check_in_a_new_process(tmp_path) == ""
    assert json.loads(kept.read_text()) == found
    # Words of the right shape at the wrong places: the live check turns soft interrupts off.
    kept.write_text(json.dumps([0, 0, 0, 8, 0]))
    assert "KeyboardInterrupt did not reach" in _soft_check_in_a_new_process(tmp_path)
