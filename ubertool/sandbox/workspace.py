"""The workspace during a restore: replayed cells must not change what the folder holds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ubertool.tools.files import remove_tree


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)  # any depth: the guest shaped this tree
    else:
        path.unlink()


@contextmanager
def set_aside(folder: Path, keep: frozenset[str]) -> Iterator[None]:
    """Move the folder's entries out while the block runs, then put them back as they were.

    Entries named in `keep` (what the folder held when the restore's image was taken, or when
    the session began) stay in place, so a replayed cell can read them. Everything the block
    writes to the folder is discarded, so a replayed cell that appends to a file does not
    append twice. The folder itself (its inode) is never replaced: an interpreter opened
    inside the block keeps seeing it.
    """
    aside = folder.parent / f".{folder.name}.restoring-{os.getpid()}"
    aside.mkdir(mode=0o700)  # it holds the workspace's files meanwhile: owner-only, like the workspace
    moved = [entry.name for entry in folder.iterdir() if entry.name not in keep]
    for name in moved:
        (folder / name).rename(aside / name)
    try:
        yield
    finally:
        for entry in folder.iterdir():
            if entry.name not in keep:
                _remove(entry)
        for name in moved:
            (aside / name).rename(folder / name)
        aside.rmdir()
