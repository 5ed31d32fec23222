"""The workspace quota while a cell runs: the session's writable folders (the workspace and the
guest's private root, where /tmp lives) are counted together, by a watcher thread that stops a
cell writing past the quota, and trimmed back after it.

Writes go from the guest straight to the host's files (wasmtime), so they are watched from
outside: the folders are walked `FIRST_S` into a cell, then every `POLL_S` (longer for a large
tree: four times what a walk took), and a cell past the quota is stopped then. What it wrote
meanwhile (about the guest's write speed times the interval: tens of MB at most for a small
tree) is cut back afterwards: the files the cell changed, largest first, are emptied until the
folders fit.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ubertool.tools.files import iter_tree

from .beside import Finish, Timer, beside, call_at

# The first look is late enough that a stream of short cells wakes no thread per cell (the
# timer thread sleeps past their ends), early enough that a fast writer is stopped within a
# few tens of MB (what it wrote is cut back after the cell all the same).
FIRST_S = 0.02
POLL_S = 0.002
MAX_POLL_S = 0.5


def used_bytes(folders: Sequence[Path]) -> int:
    """The bytes the files below `folders` hold (links not followed, folders not counted).

    Raises:
        OSError: a folder cannot be walked (e.g. a path longer than the host allows).
    """
    return sum(entry.stat(follow_symlinks=False).st_size for folder in folders for entry in iter_tree(folder)
               if not entry.is_dir(follow_symlinks=False))


class QuotaWatch:
    """A context manager around one cell's turn: while it runs, if `folders` hold more than
    `quota` bytes, `cancel` is set (the cell is stopped as a cancelled one) and `tripped` says
    so; once the block is left, `tripped` is final. It only reads the folders, on a kept
    thread: first after `FIRST_S`, then every `POLL_S` or four times what a walk took (at most
    `MAX_POLL_S`)."""

    def __init__(self, folders: Sequence[Path], quota: int, cancel: threading.Event) -> None:
        self.folders = tuple(folders)
        self.quota = quota
        self.tripped = False
        self.started = time.time()
        self._cancel = cancel
        self._done = Finish()
        self._timer: Timer | None = None

    def __enter__(self) -> QuotaWatch:
        self.started = time.time()
        self._timer = call_at(time.monotonic() + FIRST_S, self._due)
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._timer is not None:
            self._timer.cancel()

    def _due(self) -> None:  # on the timer thread, which must not wait for a walk
        beside(self._watch)

    def _watch(self) -> None:
        interval = 0.0  # the first walk at once: the cell has run `FIRST_S` already
        while not self._done.wait(interval):
            began = time.perf_counter()
            try:
                over = used_bytes(self.folders) > self.quota
            except OSError:  # a tree deeper than the host walks: the check after the cell says so
                return
            if over:
                with self._done.acting() as running:
                    if running:
                        self.tripped = True
                        self._cancel.set()
                return
            interval = min(MAX_POLL_S, max(POLL_S, 4 * (time.perf_counter() - began)))


def trim(folders: Sequence[Path], quota: int, since: float, used: int | None = None) -> list[str]:
    """Empty the files changed at or after `since` (a `time.time()`), largest first, until
    `folders` hold at most `quota` bytes; returns their paths. Files older than `since` (which
    fit the quota before) are left alone. Never follows a link. `used`: `used_bytes(folders)`
    when the caller has just measured it (None: measured here).

    Raises:
        OSError: a folder cannot be walked.
    """
    total = used_bytes(folders) if used is None else used
    if total <= quota:
        return []
    changed = []
    for folder in folders:
        for entry in iter_tree(folder):
            info = entry.stat(follow_symlinks=False)
            # A little slack: the file system's clock is coarser than time.time().
            if entry.is_file(follow_symlinks=False) and info.st_mtime >= since - 0.05 and info.st_size:
                changed.append((info.st_size, entry.path))
    emptied = []
    for size, path in sorted(changed, reverse=True):
        with contextlib.suppress(OSError):  # gone, or no longer a plain file: leave it
            os.close(os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW))
            emptied.append(path)
            total -= size
        if total <= quota:
            break
    return emptied
