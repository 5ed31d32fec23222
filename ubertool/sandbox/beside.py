"""Work that runs beside a cell's turn (its watchers) on kept threads, never one started per cell.

Starting a thread and joining it costs a few tenths of a millisecond on a loaded host: as much
as a trivial turn. `beside(fn)` hands `fn` to an idle kept thread instead (one is started only
when none is idle, so a watcher never waits behind another: the threads grow to the peak number
of watchers alive at once, then stay, idle, as daemons). Nothing waits for `fn` to return:
waking a thread only to see it end costs as much again, so a watcher and its turn agree through
a lock instead (see `Finish`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import SimpleQueue


class _Worker:
    """One kept daemon thread: it runs what it is given, then waits, idle, for more."""

    def __init__(self) -> None:
        self._work: SimpleQueue[Callable[[], None]] = SimpleQueue()
        threading.Thread(target=self._loop, name="ubertool-beside", daemon=True).start()

    def give(self, fn: Callable[[], None]) -> None:
        self._work.put(fn)

    def _loop(self) -> None:
        while True:
            self._work.get()()
            with _lock:
                _idle.append(self)


_idle: list[_Worker] = []
_lock = threading.Lock()


def beside(fn: Callable[[], None]) -> None:
    """Start `fn` on a kept thread and return at once.

    `fn` must return soon after its caller tells it to (by the caller's own event); what it
    raises is lost, as in a thread of its own, so it must catch what it expects.
    """
    with _lock:
        worker = _idle.pop() if _idle else None
    (worker or _Worker()).give(fn)


class Finish:
    """The end of one turn, as its watcher and the turn's thread agree on it: the watcher acts
    only inside `acting()`, and only while the turn runs; once `set()` has returned, no action
    of the watcher is under way or still to come, so what it recorded is final and can be read
    without waiting for the watcher to return."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()

    def set(self) -> None:
        """The turn is over; waits only for an action under way (never for the watcher's end)."""
        with self._lock:
            self._event.set()

    def wait(self, timeout: float) -> bool:
        """Whether the turn is over, waiting up to `timeout` seconds for it."""
        return self._event.wait(timeout)

    @contextmanager
    def acting(self) -> Iterator[bool]:
        """Hold off `set()` while the watcher acts; yields whether the turn still runs (act
        only then)."""
        with self._lock:
            yield not self._event.is_set()
