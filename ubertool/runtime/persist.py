"""Saved sessions: what lets a server's session outlive the server (`[sessions] persist`).

Each saved session is two blobs on a `Shelf`: in `<state>/sessions/` (owner-only files) with the
embedded SQLite journal, or in the journal's `images` table when `[journal] url` names a
PostgreSQL database, so that any front end of a cluster finds them.
- `<handle>.json`: the record: handle, run, owner (principal), the last cell its image
  reflects, the number of its next cell, its clock, its age; with an HMAC-SHA256.
- `<handle>.image`: the session image (`ubertool.sandbox.imagefile` bytes) compressed with
  zstd, after a header repeating the record's handle, run, owner and position; the HMAC
  covers header and body. Absent when the session had no image to give (it resumes by replay).
- `<handle>.files`: only for a session that may resume on another host (a cluster's): its
  workspace and private root as they were with the image (`ubertool.sandbox.carry`), sealed
  the same way.

The key is `<state>/sessions.key`: 32 random bytes, made once, 0600, never printed or logged,
and never stored beside the blobs (whoever can write the database still cannot forge one);
front ends sharing a PostgreSQL journal need the same key file to resume each other's sessions.
A record whose MAC fails is refused (the handle is then unknown); an image whose MAC fails, is
cut short, or belongs to another record is refused and the session resumes by replaying its
journal, saying so. Both are checked before anything in them is used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread
import zstandard

from ubertool.runtime.home import state_folder
from ubertool.runtime.journal import Journal
from ubertool.runtime.runs import Resumed, Run
from ubertool.runtime.stores import SqliteStore
from ubertool.sandbox import PastCell, Resume, Status
from ubertool.sandbox.result import COMPLETED
from ubertool.tools.files import open_private, remove_tree, write_whole

log = logging.getLogger("ubertool.runtime")

HANDLE = re.compile(r"^s-[A-Za-z0-9_-]{16}$")  # what `SessionManager` mints: nothing else is a path
_KEY_BYTES = 32
_MAC_BYTES = 32
_MAGIC = {b"image": b"ubertool-saved-image-1\n", b"files": b"ubertool-saved-files-1\n"}
_LEVEL = 1  # zstd: 7x on a fresh interpreter's memory in ~35 ms (session-images note)
_MAX_HEADER = 2**16


class RecordRefused(ValueError):
    """A saved session's record or image failed its check (the message says which)."""


class NotYours(LookupError):
    """The saved session belongs to another principal (answered as an unknown handle)."""


@dataclass(frozen=True)
class Record:
    """A saved session. `through`: the last completed cell the image reflects (cells after it
    are replayed from the journal); `age_s`: how long it had lived when saved."""

    handle: str
    run_id: str
    owner: str
    through: int
    next_cell: int
    clock_ns: int
    age_s: float
    saved_at: float  # wall-clock seconds, for pruning


class Shelf(Protocol):
    """Where a store's blobs sit, by name (`<handle>.json`, `<handle>.image`). A `put` is whole
    or not at all; every method blocks."""

    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> bytes | None: ...
    def delete(self, name: str) -> None: ...
    def names(self) -> list[str]: ...


class FolderShelf:
    """Blobs as owner-only files in `folder`, each written to a temporary and renamed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def put(self, name: str, data: bytes) -> None:
        write_whole(self.folder / name, data)

    def get(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob("s-*"))


class JournalShelf:
    """Blobs in the journal's `images` table (one transaction each)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def put(self, name: str, data: bytes) -> None:
        self.journal.put_image(name, data, {})

    def get(self, name: str) -> bytes | None:
        stored = self.journal.get_image(name)
        return None if stored is None else stored.data

    def delete(self, name: str) -> None:
        self.journal.delete_image(name)

    def names(self) -> list[str]:
        return self.journal.image_names()


class SessionStore:
    """The saved sessions on `shelf` (a folder: made 0700), authenticated with the key at `key_path`."""

    @classmethod
    def default(cls, journal: Journal | None = None) -> SessionStore:
        """The store beside `journal`: in the journal when it is shared (PostgreSQL), else in the
        state folder (`<state>/sessions/`); the key is `<state>/sessions.key` either way."""
        shared = journal is not None and not isinstance(journal.store, SqliteStore)
        shelf: Shelf = JournalShelf(journal) if shared and journal else FolderShelf(state_folder("sessions"))
        return cls(shelf, state_folder() / "sessions.key")

    def __init__(self, shelf: Shelf | Path, key_path: Path) -> None:
        self.shelf = FolderShelf(shelf) if isinstance(shelf, Path) else shelf
        self._key = _load_key(key_path)

    def _mac(self, kind: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, kind + b"\0" + data, hashlib.sha256).digest()

    def _name(self, handle: str, suffix: str) -> str:
        if not HANDLE.match(handle):
            raise RecordRefused(f"{handle!r} is not a session handle")
        return f"{handle}{suffix}"

    def save(self, record: Record, image: bytes | None, files: bytes | None = None) -> None:
        """Write `record`, `image` and `files` (its folders, `carry.pack`), each atomically, 0600;
        a None blob deletes an older one. Blocks (compression: tens of milliseconds per 40 MiB)."""
        for kind, blob in ((b"image", image), (b"files", files)):
            name = self._name(record.handle, "." + kind.decode())
            if blob is None:
                self.shelf.delete(name)
                continue
            header = json.dumps(_binding(record), sort_keys=True).encode()
            body = zstandard.ZstdCompressor(level=_LEVEL).compress(blob)
            signed = b"".join((_MAGIC[kind], struct.pack(">I", len(header)), header, body))
            self.shelf.put(name, signed + self._mac(kind, signed))
        text = json.dumps(asdict(record), sort_keys=True)
        mac = self._mac(b"record", text.encode()).hex()
        self.shelf.put(self._name(record.handle, ".json"), json.dumps({"record": text, "mac": mac}).encode())

    def record(self, handle: str) -> Record | None:
        """The saved record of `handle`; None when there is none.

        Raises:
            RecordRefused: it is not a handle, or its record failed its check (logged).
        """
        raw = self.shelf.get(self._name(handle, ".json"))
        if raw is None:
            return None
        try:
            outer = json.loads(raw)
            text, mac = outer["record"], bytes.fromhex(outer["mac"])
            if not hmac.compare_digest(mac, self._mac(b"record", text.encode())):
                raise RecordRefused("its MAC does not match")
            record = Record(**json.loads(text))
            if record.handle != handle:
                raise RecordRefused("it is another session's")
            return record
        except RecordRefused as exc:
            log.warning("the saved record of session %s was refused: %s", handle, exc)
            raise
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("the saved record of session %s was refused: malformed", handle)
            raise RecordRefused(f"it is malformed ({type(exc).__name__})") from None

    def image(self, record: Record) -> tuple[bytes | None, str]:
        """The image saved with `record` and '', or None and why there is none to use (a
        refusal is also logged). Blocks (decompression)."""
        return self._blob(record, b"image")

    def files(self, record: Record) -> tuple[bytes | None, str]:
        """The folders saved with `record`, as `image`."""
        return self._blob(record, b"files")

    def _blob(self, record: Record, kind: bytes) -> tuple[bytes | None, str]:
        signed = self.shelf.get(self._name(record.handle, "." + kind.decode()))
        if signed is None:
            return None, ""
        try:
            return self._open(kind, signed, record), ""
        except RecordRefused as exc:
            log.warning("the saved %s of session %s was refused: %s", kind.decode(), record.handle, exc)
            return None, f"the saved {kind.decode()} was refused: {exc}"

    def _open(self, kind: bytes, signed: bytes, record: Record) -> bytes:
        magic = _MAGIC[kind]
        body_at = len(magic) + 4
        if len(signed) < body_at + _MAC_BYTES or not signed.startswith(magic):
            raise RecordRefused(f"it is cut short or not a saved {kind.decode()}")
        data, mac = signed[:-_MAC_BYTES], signed[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(kind, data)):
            raise RecordRefused("its MAC does not match (changed or cut short)")
        (size,) = struct.unpack(">I", data[len(magic):body_at])
        try:
            bound = json.loads(data[body_at:body_at + size]) if size <= _MAX_HEADER else None
        except ValueError:
            bound = None
        if bound != _binding(record):
            raise RecordRefused("it belongs to another session or position")
        try:
            return zstandard.ZstdDecompressor().decompress(data[body_at + size:])
        except zstandard.ZstdError as exc:
            raise RecordRefused(f"its body does not decompress ({exc})") from None

    def delete(self, handle: str) -> None:
        """Forget `handle`'s saved record and image (missing ones are fine)."""
        for suffix in (".json", ".image", ".files"):
            self.shelf.delete(self._name(handle, suffix))

    def handles(self) -> list[str]:
        """The handles with a saved record."""
        return sorted(name.removesuffix(".json") for name in self.shelf.names()
                      if name.endswith(".json") and HANDLE.match(name.removesuffix(".json")))

    def prune(self, live_runs: Iterable[str], older_than_s: float) -> list[str]:
        """Delete saved sessions whose run is not in `live_runs` (pruned from the journal, or
        never in it), saved more than `older_than_s` ago, or whose record fails its check;
        returns the runs of those whose record could be read."""
        keep = set(live_runs)
        removed = []
        for handle in self.handles():
            try:
                record = self.record(handle)
            except RecordRefused:
                record = None
            if record is None or record.run_id not in keep or time.time() - record.saved_at > older_than_s:
                self.delete(handle)
                removed += [record.run_id] if record is not None else []
        names = set(self.shelf.names())
        for orphan in names:  # an image or folders whose record is gone
            handle = orphan.removesuffix(".image").removesuffix(".files")
            if handle != orphan and HANDLE.match(handle) and f"{handle}.json" not in names:
                self.shelf.delete(orphan)
        return removed


def prune_saved(store: SessionStore, journal: Journal, older_than_s: float, keep_workspaces: bool) -> int:
    """`store.prune` against the journal's runs; the folders the pruned sessions kept (their
    private root, and their workspace unless the policy keeps workspaces) are removed too.
    Returns how many were pruned. Blocks."""
    runs = store.prune([run.id for run in journal.runs(limit=2**31)], older_than_s)
    for run_id in runs:
        folder = state_folder("runs", run_id)
        for name in ("root", *(() if keep_workspaces else ("workspace",))):
            try:
                remove_tree(folder / name)
            except OSError as exc:  # left behind, still owner-only
                log.warning("%s could not be removed: %s", folder / name, exc)
    return len(runs)


def _binding(record: Record) -> dict[str, object]:
    """What ties an image (or folders) to its record: a swapped or stale one is refused, one of
    an earlier save at the same position too (the session's clock tells saves apart)."""
    return {"handle": record.handle, "run_id": record.run_id, "owner": record.owner,
            "through": record.through, "next_cell": record.next_cell, "clock_ns": record.clock_ns}


def _load_key(path: Path) -> bytes:
    """The store's key, made on first use (0600, exclusive create: two servers starting at once
    agree on one key). A key of the wrong length is an error, never silently replaced: replacing
    it would make every saved session unusable."""
    try:
        fd = open_private(path, os.O_WRONLY | os.O_EXCL)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(_KEY_BYTES))
            file.flush()
            os.fsync(file.fileno())
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise OSError(f"{path} is not a session key ({len(key)} bytes, not {_KEY_BYTES}); remove it to make "
                      "a new one (sessions saved with the old key then cannot be resumed)")
    return key


async def save_session(store: SessionStore, handle: str, owner: str, run: Run, age_s: float, *,
                       carry: bool = False) -> None:
    """Save `run`'s session under `handle` (waits for a running cell; blocks a worker thread
    for the image and its compression), audited; with `carry`, its folders too (to resume on
    another host).

    Raises:
        SessionClosed: the session was closed meanwhile.
        OSError: the store could not be written.
    """
    started = time.perf_counter()
    saved = await run.session.save(carry=carry)
    record = Record(handle, run.id, owner, saved.through, saved.next_cell, saved.clock_ns, age_s, time.time())
    await anyio.to_thread.run_sync(store.save, record, saved.image, saved.files)
    run.audit.event("session_saved", session=handle, through=saved.through,
                    image_bytes=len(saved.image) if saved.image is not None else None,
                    files_bytes=len(saved.files) if saved.files is not None else None,
                    no_image=saved.why or None, seconds=round(time.perf_counter() - started, 3))


async def load_session(store: SessionStore, journal: Journal, handle: str, principal: str, *,
                       moved: str = "") -> tuple[Record, Resumed] | None:
    """What resumes the saved session `handle` for `principal`: None when there is none, its
    record was refused, or its run is gone from the journal (the caller answers these as an
    unknown handle). An image that is refused is left out: the session then resumes by
    replaying its journal, and says so. `moved` (why: e.g. "the loss of its node") resumes it
    on another host: its saved folders go with the image, and an image saved without them is
    not used.

    Raises:
        NotYours: it is another principal's (answer as an unknown handle too, and audit it).
    """
    try:
        record = store.record(handle)
    except RecordRefused:
        return None
    if record is None:
        return None
    if record.owner != principal:
        raise NotYours(record.run_id)
    if journal.find_run(record.run_id) is None:  # pruned: nothing to resume from
        store.delete(handle)
        return None
    image, note = await anyio.to_thread.run_sync(store.image, record)
    files = None
    if moved and image is not None:
        files, note = await anyio.to_thread.run_sync(store.files, record)
    cells = tuple(journal.cells(record.run_id))
    history = tuple(PastCell(c.number, c.code, True, Status(c.status), c.exchanges, c.duration_s)
                    for c in cells if c.status in COMPLETED)
    resume = Resume(history, image, record.through, record.next_cell, record.clock_ns, note, files, moved)
    return record, Resumed(record.run_id, cells, resume)
