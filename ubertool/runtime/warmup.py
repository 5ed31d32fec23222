"""The sandbox's one-time compile, with visible progress."""

from __future__ import annotations

import sys
import time

import anyio
import anyio.to_thread

from ubertool.sandbox import warm

_QUIET_S = 4.0  # a warm cache loads well within this, even on a loaded machine: say nothing then
# Said when loading takes long: a first compile (once per machine), or a busy machine.
_NOTE = "Preparing the sandbox (the first time on a machine it compiles: about a minute)"


async def _progress(started: float) -> None:
    await anyio.sleep(_QUIET_S)
    tty = sys.stderr.isatty()
    if not tty:
        print(f"{_NOTE}...", file=sys.stderr, flush=True)
    spin = "|/-\\"
    tick = 0
    while True:
        elapsed = time.monotonic() - started
        if tty:
            print(f"\r{spin[tick % 4]} {_NOTE}: {elapsed:4.0f} s", end="", file=sys.stderr, flush=True)
        elif tick and tick % 40 == 0:
            print(f"  still preparing: {elapsed:.0f} s", file=sys.stderr, flush=True)
        tick += 1
        await anyio.sleep(0.25)


async def warm_with_progress() -> float:
    """Make sure the compiled sandbox is in the cache; returns the seconds it took."""
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_progress, started)
        await anyio.to_thread.run_sync(warm)
        tg.cancel_scope.cancel()
    elapsed = time.monotonic() - started
    if elapsed > _QUIET_S:
        end = "\r" if sys.stderr.isatty() else ""
        print(f"{end}Sandbox ready ({elapsed:.0f} s).{' ' * 60}", file=sys.stderr, flush=True)
    return elapsed
