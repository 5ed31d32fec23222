"""Work that runs beside a cell's turn (its watchers) on kept threads, never one started per cell.

Starting a thread and joining it costs a few tenths of a millisecond on a loaded host: as much
as a trivial turn. `beside(fn)` hands `fn` to an idle kept thread instead (one is started only
when none is idle, so a watcher never waits behind another: the threads grow to the peak number
of turns running at once, then stay, idle, as daemons).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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


def beside(fn: Callable[[], None]) -> threading.Event:
    """Start `fn` on a kept thread; the event returned is set once `fn` has returned (wait
    for it where a started thread would be joined).

    `fn` must return soon after its caller tells it to (by the caller's own event); what it
    raises is lost, as in a thread of its own, so it must catch what it expects.
    """
    done = threading.Event()

    def task() -> None:
        try:
            fn()
        finally:
            done.set()

    with _lock:
        worker = _idle.pop() if _idle else None
    (worker or _Worker()).give(task)
    return done
