"""The one seam every crossing to the outside goes through: live, it performs and records;
replaying, it answers from a recording and performs nothing.

Restore after a timeout replays earlier cells with their recorded exchanges, so no request is
sent twice; playbooks' offline replay uses the same mechanism. Exchanges are matched by kind
and request; a mismatch is raised, never guessed around.

A *reusable* exchange (a read: the same request gets the same answer until something changes
it) is performed once per run: a repeat is answered from the run's answers and is not a new
exchange, until `forget` drops that answer (a write to the same place). Replaying follows the
same rule, so it asks the recording for exactly what was recorded. In a recording, reusable
exchanges are matched by request wherever they stand; the others in order.

With a `Redactor`, every exchange passes it before it is kept or answered: the journal, the
playbooks dumped from it and the guest all get the same redacted record, live or replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ubertool.tools import ToolFailure
from ubertool.tools.files import open_private, private_folder
from ubertool.tools.redact import Redactor

Json = dict[str, Any]


@dataclass(frozen=True)
class Body:
    """Bytes kept in a spool file instead of memory (`size` bytes at `offset`); equal when
    their content is."""

    sha256: str
    size: int
    path: Path = field(compare=False, repr=False)
    offset: int = field(default=0, compare=False, repr=False)

    def read(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            parts = []
            done = 0
            while done < self.size:  # a single pread may return less (over 2 GiB on Linux)
                part = os.pread(fd, self.size - done, self.offset + done)
                if not part:
                    raise OSError(f"the spool file {self.path} ends before its body")
                parts.append(part)
                done += len(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            os.close(fd)


class Spool:
    """A run's bodies, each kept once by its content, in one owner-only file that only grows
    (no file made per body: making one costs more than writing a MiB into it). The folder and
    the file are made at first use and removed by `close`. Thread-safe: one body is written at
    a time (a writer holds the spool until it is done or dropped)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "bodies"
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._end = 0
        self._kept: dict[str, Body] = {}

    def writer(self) -> SpoolWriter:
        """A place to stream one body into, at the end of the spool file; blocks while another
        writer is open. `SpoolWriter.done()` names it by its hash."""
        self._lock.acquire()
        try:
            if self._file is None:
                private_folder(self.folder)
                self._file = open(open_private(self.path, os.O_RDWR | os.O_EXCL), "r+b")  # noqa: SIM115
            self._file.seek(self._end)
            return SpoolWriter(self, self._file, self._end)
        except BaseException:
            self._lock.release()
            raise

    def put(self, data: bytes) -> Body:
        with self.writer() as writer:
            writer.write(data)
            return writer.done()

    def _finish(self, file: BinaryIO, start: int, size: int, digest: str | None) -> Body | None:
        """A writer's end (its lock released): its body kept (`digest`), or dropped (None).

        Raises:
            OSError: the spool was closed while the body was written; nothing is kept.
        """
        try:
            if file is not self._file:
                if digest is None:
                    return None
                raise OSError(f"the spool {self.folder} was closed while a body was written")
            kept = self._kept.get(digest) if digest is not None else None
            if digest is None or kept is not None:  # dropped, or the same content kept before
                file.truncate(start)
                return kept
            file.flush()
            self._end = start + size
            self._kept[digest] = Body(digest, size, self.path, start)
            return self._kept[digest]
        finally:
            self._lock.release()

    def close(self) -> None:
        """Remove the spool and its bodies. Never waits for a writer: one still streaming (a
        cell stopped in the middle of a fetch) fails (ValueError or OSError) and keeps nothing."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
        self._kept.clear()
        self._end = 0
        for entry in self.folder.glob("*") if self.folder.is_dir() else ():
            entry.unlink(missing_ok=True)
        if self.folder.is_dir():
            self.folder.rmdir()


class SpoolWriter:
    """One body being written (a context manager: a body not `done()` is dropped)."""

    def __init__(self, spool: Spool, file: BinaryIO, start: int) -> None:
        self._spool = spool
        self._file = file
        self._start = start
        self._hash = hashlib.sha256()
        self._body: Body | None = None
        self._open = True
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def done(self) -> Body:
        """The body, kept (once per content: a repeat is the body kept before)."""
        if self._open:
            self._open = False
            self._body = self._spool._finish(self._file, self._start, self.size, self._hash.hexdigest())
        assert self._body is not None
        return self._body

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:
            self._open = False
            self._spool._finish(self._file, self._start, self.size, None)


@dataclass(frozen=True)
class Exchange:
    """One crossing: what was asked (`request`) and what came back (`response`): JSON values,
    and bytes or `Body` for bodies (whoever stores an exchange encodes those). `reusable`: a
    read whose answer stands for the same request later in the run."""

    kind: str
    request: Json
    response: Json
    reusable: bool = False

    @property
    def key(self) -> str:
        return _key(self.kind, self.request)


def _key(kind: str, request: Json) -> str:
    return json.dumps([kind, request], sort_keys=True, default=str)


@dataclass(frozen=True)
class Checkpoint:
    """Where a replay starts (see `Recorder.checkpoint`)."""

    answers: dict[str, Json]
    hooks: tuple[Any, ...]


class ReplayMismatch(RuntimeError):
    """A replayed cell asked for something the recording does not hold there."""


@dataclass
class _Replay:
    ordered: list[Exchange]  # the non-reusable ones, in order
    reusable: dict[str, list[Exchange]]  # by key, in order


class Recorder:
    """Records a session's exchanges; thread-safe (a cell's turn runs on a worker thread)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        self._redactor = redactor
        self._log: list[Exchange] = []
        self._answers: dict[str, Json] = {}
        self._replay: _Replay | None = None
        self._lock = threading.Lock()
        self._hooks: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []
        self._origin = Checkpoint({}, ())
        self.mismatch: str = ""

    def on_rewind(self, save: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        """Host state that replayed calls rebuild (e.g. packages the guest installed): `save()`
        is kept with every checkpoint (and now, as the run's start), and a replay from one
        calls `restore(saved)` first."""
        self._hooks.append((save, restore))
        self._origin = Checkpoint({}, (*self._origin.hooks, save()))

    def checkpoint(self) -> Checkpoint:
        """The run's state as a replay must find it to go on from here: the answers kept, and
        what each `on_rewind` hook saves. Take it between cells (with a session image)."""
        with self._lock:
            answers = dict(self._answers)
        return Checkpoint(answers, tuple(save() for save, _ in self._hooks))

    @property
    def replaying_now(self) -> bool:
        return self._replay is not None

    def exchange(self, kind: str, request: Json, perform: Callable[[], Json], *,
                 reusable: bool = False) -> Json:
        """The response to `request`: performed and recorded live, or read from the recording;
        both redacted when the recorder has a redactor (a replay is matched redacted too). A
        `reusable` request already answered in this run is answered again, unrecorded.

        Raises:
            ReplayMismatch: replaying, and the recording does not hold this request.
        """
        if self._redactor is not None:
            request = self._redactor.json(request)
        key = _key(kind, request)
        with self._lock:
            if reusable and key in self._answers:
                return self._answers[key]
            replay = self._replay
            if replay is not None:
                found = self._next_recorded(replay, kind, request, key, reusable)
                self._log.append(found)
                if reusable:
                    self._answers[key] = found.response
                return found.response
        response = perform()
        if self._redactor is not None:
            response = self._redactor.json(response)
        with self._lock:
            self._log.append(Exchange(kind, request, response, reusable))
            if reusable:
                self._answers[key] = response
        return response

    def _next_recorded(self, replay: _Replay, kind: str, request: Json, key: str, reusable: bool) -> Exchange:
        queue = replay.reusable.get(key) if reusable else None
        if not queue:  # not reusable, or a recording that did not mark its reads: in order
            queue = replay.ordered
        expected = queue[0] if queue else None
        if expected is None or expected.key != key:
            held = "nothing more" if expected is None else f"{expected.kind} {expected.request}"
            self.mismatch = f"the replay asked for {kind} {request}, but the recording holds {held}"
            raise ReplayMismatch(self.mismatch)
        del queue[0]
        return expected

    def forget(self, kind: str, request: Json) -> None:
        """Drop the run's answer to a reusable request (something changed what it reads)."""
        if self._redactor is not None:
            request = self._redactor.json(request)
        with self._lock:
            self._answers.pop(_key(kind, request), None)

    def take(self) -> tuple[Exchange, ...]:
        """The exchanges since the last `take`, and forget them."""
        with self._lock:
            log, self._log = tuple(self._log), []
        return log

    @contextmanager
    def replaying(self, exchanges: Iterable[Exchange], start: Checkpoint | None = None) -> Iterator[None]:
        """Answer every exchange in the block from `exchanges`, starting from `start` (default:
        the run's start: no answers kept). Afterwards the mode before it comes back, and the
        answers the block rebuilt stay (a restore leaves the run where the replay got it)."""
        recorded = list(exchanges)
        start = start or self._origin
        for (_, restore), saved in zip(self._hooks, start.hooks, strict=True):
            restore(saved)
        replay = _Replay([e for e in recorded if not e.reusable], {})
        for e in recorded:
            if e.reusable:
                replay.reusable.setdefault(e.key, []).append(e)
        with self._lock:
            before = self._replay
            self._replay, self._answers, self._log = replay, dict(start.answers), []
            self.mismatch = ""
        try:
            yield
        finally:
            with self._lock:  # the answers the replay rebuilt are the run's own from here on
                self._replay, self._log = before, []


def recorded_call(recorder: Recorder, tool: str, arguments: Json, perform: Callable[[], Json]) -> Json:
    """A host tool's call through `recorder`: its answer, or its `ToolFailure` (recorded as
    an answer too, so a replay fails the same way)."""
    def attempt() -> Json:
        try:
            return perform()
        except ToolFailure as exc:
            return {"error": str(exc)}

    answer = recorder.exchange("tool", {"tool": tool, "arguments": arguments}, attempt)
    if "error" in answer:
        raise ToolFailure(answer["error"])
    return answer
