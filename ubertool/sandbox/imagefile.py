"""A session image as bytes, for a session that outlives its process (see `SandboxSession.save`).

Format: `MAGIC`, a 4-byte big-endian header length, a JSON header (the configuration's
fingerprint, the open files, the mount table's counters, the memory's length), then the guest's
linear memory. Nothing here authenticates or compresses: the runtime's store does both, and
hands `loads` only bytes whose MAC it checked. `loads` still checks every field's type and
bounds: a refusal is `ImageRefused`, never a crash, and a file number or path comes back only
as the guest's own table had it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

from .images import Image, MountState, OpenFile

MAGIC = b"ubertool-image-1\n"
_FILE_FIELDS = tuple(f.name for f in dataclasses.fields(OpenFile))
_MAX_HEADER = 16 * 2**20


class ImageRefused(ValueError):
    """The bytes are not an image this build can restore for this configuration."""


class NotSavable(ValueError):
    """The image holds what cannot leave the process (an open file of a provider mount)."""


def dumps(image: Image, fingerprint: str) -> bytes:
    """`image` as bytes, bound to `fingerprint` (see `engine.fingerprint`).

    Raises:
        NotSavable: a provider mount's file is open: its staged bytes live host-side, in
            objects of the mount's provider, which a new process does not have.
    """
    mounts = image.mounts
    if image.marks or (mounts is not None and (mounts.entries or mounts.owed)):
        raise NotSavable("a file of a provider mount is open")
    header = {
        "fingerprint": fingerprint,
        "memory": len(image.memory),
        "files": [[getattr(f, name) if name != "path" else f.path.hex() for name in _FILE_FIELDS]
                  for f in image.files],
        "mounts": None if mounts is None else [list(mounts.free), mounts.next, mounts.opened, mounts.staged],
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((MAGIC, struct.pack(">I", len(text)), text, image.memory))


def loads(data: bytes, fingerprint: str) -> Image:
    """The image in `data`, made by `dumps` for the same `fingerprint`.

    Raises:
        ImageRefused: another format, another configuration, or a field out of shape.
    """
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ImageRefused("not a session image of this ubertool")
    (size,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4 + size
    if size > _MAX_HEADER or start > len(data):
        raise ImageRefused("the image's header is cut short")
    try:
        header = json.loads(data[len(MAGIC) + 4:start])
        if header["fingerprint"] != fingerprint:
            raise ImageRefused("the image was made for another configuration (policy, limits, mounts, "
                               "tools or ubertool version)")
        memory = data[start:]
        if header["memory"] != len(memory) or len(memory) % 65536:
            raise ImageRefused("the image's memory is not the length its header says")
        files = tuple(_file(row) for row in header["files"])
        mounts = _mounts(header["mounts"])
    except ImageRefused:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ImageRefused(f"the image's header is malformed ({type(exc).__name__})") from None
    return Image(memory, files, mounts, ())


def _int(value: Any, low: int = 0, high: int = 2**64 - 1) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError("a number out of range")
    return value


def _file(row: Any) -> OpenFile:
    fields = dict(zip(_FILE_FIELDS, row, strict=True))
    path = bytes.fromhex(fields.pop("path"))
    offset = fields.pop("offset")
    numbers = {name: _int(value) for name, value in fields.items()}
    if numbers["number"] < 3 or numbers["number"] >= 2**30 or len(path) > 4096:
        raise ValueError("a file number or path out of range")
    return OpenFile(path=path, offset=None if offset is None else _int(offset), **numbers)


def _mounts(row: Any) -> MountState | None:
    if row is None:
        return None
    free, nxt, opened, staged = row
    return MountState((), (), tuple(_int(n) for n in free), _int(nxt), _int(opened), _int(staged))
