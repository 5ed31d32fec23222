"""Host writes into folders the guest controls (its workspace), without following its links.

The guest may create relative links in its workspace (`x -> ..`); a host that then writes to
`workspace/x` would write outside it. These helpers never follow a link in the last two steps.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_no_follow(folder: Path, name: str, data: bytes) -> None:
    """Write `folder/name` (making `folder` if missing) without following any link there.

    Raises:
        OSError: `folder` or `name` is a link, or the write failed.
    """
    with contextlib.suppress(FileExistsError):
        folder.mkdir()
    folder_fd = os.open(folder, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0))
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=folder_fd)
    finally:
        os.close(folder_fd)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
