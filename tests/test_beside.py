"""The timer thread and the cancel event that a turn's watchers run on (`sandbox.beside`)."""

from __future__ import annotations

import threading
import time

from ubertool.sandbox.beside import Cancel, call_at


def test_timers_run_in_time_order_and_a_cancelled_one_never_runs() -> None:
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    call_at(now + 0.10, lambda: (ran.append("late"), done.set()))
    dropped = call_at(now + 0.05, lambda: ran.append("dropped"))
    call_at(now + 0.02, lambda: ran.append("early"))
    call_at(now - 1.0, lambda: ran.append("past"))  # a time gone by: at once
    dropped.cancel()
    assert done.wait(5)
    assert ran == ["past", "early", "late"]


def test_a_timer_that_raises_stops_no_later_one() -> None:
    def fail() -> None:
        raise RuntimeError("a watcher's bug")

    fired = threading.Event()
    now = time.monotonic()
    call_at(now, fail)
    call_at(now + 0.01, fired.set)
    assert fired.wait(5)


def test_an_earlier_timer_wakes_the_thread_sleeping_for_a_later_one() -> None:
    """The thread sleeps until the earliest timer: one added before it must not wait for it."""
    far = call_at(time.monotonic() + 60, lambda: None)
    fired = threading.Event()
    started = time.monotonic()
    call_at(started + 0.01, fired.set)
    assert fired.wait(5)
    assert time.monotonic() - started < 1.0
    far.cancel()


def test_many_cancelled_timers_do_not_pile_up() -> None:
    """A turn cancels its deadline when it ends: a stream of them leaves the heap bounded."""
    from ubertool.sandbox import beside

    for _ in range(5000):
        call_at(time.monotonic() + 3600, lambda: None).cancel()
    assert len(beside._timers._heap) < 1000


def test_a_cancel_calls_its_hooks_from_the_setter_and_at_once_when_already_set() -> None:
    cancel = Cancel()
    calls: list[str] = []
    with cancel.hooked(lambda: calls.append("first")):
        assert calls == []
        cancel.set()
        assert calls == ["first"]
        with cancel.hooked(lambda: calls.append("late")):  # hooked after the set: called at once
            pass
    assert calls == ["first", "late"]
    cancel.set()  # the hooks went with their blocks
    assert calls == ["first", "late"] and cancel.is_set()
