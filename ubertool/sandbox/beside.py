"""Work beside a cell's turn, never a thread started (or woken) per cell.

Starting or waking a thread costs a few tenths of a millisecond on a loaded host: as much as a
trivial turn. So a turn's watching is done by one process-wide timer thread (`call_at`), which
sleeps until the earliest thing due and is woken only when something earlier is added: a
stream of short cells, each with its deadline, wakes it now and then, not per cell. A stop
asked from outside (`Cancel.set`) reaches a turn's watcher at once through the same thread.
Work that may take long (a walk of the folders) goes from there to a kept thread (`beside`),
so no watcher waits behind another's.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import SimpleQueue

log = logging.getLogger(__name__)


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
    """Start `fn` on a kept thread and return at once (a thread is started only when none is
    idle: the threads grow to the peak number of `fn`s running at once, then stay, idle).

    `fn` must return soon after its caller tells it to (by the caller's own event); what it
    raises is lost, as in a thread of its own, so it must catch what it expects.
    """
    with _lock:
        worker = _idle.pop() if _idle else None
    (worker or _Worker()).give(fn)


class Timer:
    """One call waiting in the timer thread; `cancel()` drops it (it may already have run)."""

    __slots__ = ("fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        self.fn = None  # left in the heap: popped, not run, when its time comes


class _Timers:
    """The timer thread's heap. Cancelled timers stay until due or until the heap has doubled
    since it was last rebuilt (then only the live ones are kept), so a cancel costs nothing but
    a store, and the heap stays within twice the live timers (plus 256)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._target = float("inf")  # when the thread wakes next, unless notified
        self._thread: threading.Thread | None = None
        self._rebuild_at = 256

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(when, fn)
        with self._wake:
            if len(self._heap) >= self._rebuild_at:
                self._heap = [entry for entry in self._heap if entry[2].fn is not None]
                heapq.heapify(self._heap)
                self._rebuild_at = 2 * len(self._heap) + 256
            heapq.heappush(self._heap, (when, next(self._order), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ubertool-timers", daemon=True)
                self._thread.start()
            elif when < self._target:
                self._wake.notify()
        return timer

    def _loop(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].fn is None or self._heap[0][0] <= now):
                    timer = heapq.heappop(self._heap)[2]
                    fn, timer.fn = timer.fn, None
                    if fn is not None:
                        break
                else:
                    fn = None
                if fn is None:
                    self._target = self._heap[0][0] if self._heap else float("inf")
                    self._wake.wait(None if not self._heap else max(0.0, self._target - now))
                    self._target = 0.0  # awake: a new timer need not notify
                    continue
            try:
                fn()  # outside the lock: it may add timers
            except Exception:  # one watcher's failure must not stop every other turn's
                log.exception("a timer's call failed")


_timers = _Timers()


def call_at(when: float, fn: Callable[[], None]) -> Timer:
    """Call `fn` on the timer thread at `when` (a `time.monotonic()`), or at once if it has
    passed. `fn` must be quick (set an event, write a flag, hand work to `beside`): every
    watcher of the process waits behind it. What it raises is logged, and the timer thread
    goes on."""
    return _timers.call_at(when, fn)


class Cancel(threading.Event):
    """A turn's stop, asked from any thread: an event whose `set()` also calls the hooks of
    the turn's watcher (which must be quick: see `call_at`)."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []
        self._hooks_lock = threading.Lock()

    def set(self) -> None:
        with self._hooks_lock:
            super().set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    @contextmanager
    def hooked(self, hook: Callable[[], None]) -> Iterator[None]:
        """Call `hook` when the event is set inside the block (at once if it is set already)."""
        with self._hooks_lock:
            self._hooks.append(hook)
            already = self.is_set()
        if already:
            hook()
        try:
            yield
        finally:
            with self._hooks_lock:
                self._hooks.remove(hook)


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
