"""Remote-resource mounts: folders whose files the host serves on the guest's behalf.

A provider answers `stat`, `list` and `read` (and, when writable, `write`, `remove`, `mkdir`,
`rmdir`, `rename`, plus `flush` at the end of each cell) on absolute, normalized paths within
the mount. It fails by raising the builtin `OSError` subclasses (`FileNotFoundError`,
`PermissionError`, `TimeoutError`, ...) or `OSError(errno, message)`; the guest sees the same.
These are ubertool's own interfaces: `ubertool.sandbox` adapts them to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class Entry:
    """What a path is: a file (with its size) or a folder."""

    kind: Literal["file", "dir"]
    size: int = 0


class Provider(Protocol):
    def stat(self, path: str) -> Entry: ...
    def list(self, path: str) -> list[tuple[str, str]]: ...
    def read(self, path: str) -> bytes: ...


class WritableProvider(Provider, Protocol):
    def write(self, path: str, data: bytes) -> None: ...
    def remove(self, path: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def flush(self) -> None: ...
