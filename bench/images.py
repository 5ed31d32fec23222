"""Session images: restore after a hard stop, from an image vs by replay, in the same run.

For each history length, two sessions run the same cells (each a few ms of guest work, plus
an import of pandas first, so memory is not trivial); then one cell sleeps past its limit (only
the hard stop ends it) and the restore's time is printed beside replay's. Also printed: the
cost of one image (copy + open-file offsets), its size, the process RSS, and a new session's
time to a first pandas result from a warm template vs fresh; a new server session's first
result from the pool vs opened on demand; the host memory one session holds with its image;
and a saved session's resume (store load: MAC, zstd, then the image put in) beside its replay.
Asserts nothing.

    .venv/bin/python bench/images.py [--cells 10 100 500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import anyio

from ubertool.runtime.persist import Record, SessionStore
from ubertool.sandbox import Limits, PastCell, Resume, SandboxConfig, SandboxSession, engine


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CELL = "part{i} = sum(random.random() for _ in range(20_000))"


async def restore_after(cells: int, folder: Path, images: bool) -> tuple[float, int]:
    """Seconds the restore took after `cells` cells, and how many cells it replayed."""
    workspace = folder / f"ws-{cells}-{images}"
    workspace.mkdir()
    config = SandboxConfig(workspace=workspace, limits=Limits(timeout_s=60, restore_timeout_s=300))
    async with SandboxSession(config) as session:
        if not images:  # the bench's own switch: the session as with a failed self-test
            session._images = session._soft = False
        await session.run("import random, pandas as pd")
        for i in range(cells - 1):
            await session.run(CELL.format(i=i))
        result = await session.run("import time\ntime.sleep(100)", timeout_s=0.2)
        assert result.restored is not None and result.restored.ok, result.restored
        return result.restored.seconds, result.restored.cells


async def image_cost(folder: Path) -> None:
    workspace = folder / "ws-cost"
    workspace.mkdir()
    async with SandboxSession(SandboxConfig(workspace=workspace)) as session:
        await session.run("import random, pandas as pd, numpy as np")
        interp = session._interp
        assert interp is not None
        before = rss_mib()
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            image = engine.take_image(interp)
            samples.append((time.perf_counter() - started) * 1000)
        samples.sort()
        print(f"  image of {len(image.memory) >> 20} MiB: median {samples[2]:.1f} ms to take; "
              f"process RSS {rss_mib():.0f} MiB (+{rss_mib() - before:.0f} MiB for 5 images taken)")


async def pandas_ready(folder: Path, template: tuple[str, ...]) -> float:
    """Median ms from a new session to a first pandas result (3 sessions; the first session of
    a template configuration, which makes the template, is left out)."""
    workspace = folder / f"ws-ready-{bool(template)}"
    workspace.mkdir()
    config = SandboxConfig(workspace=workspace, template=template)
    samples = []
    for _ in range(4):
        started = time.perf_counter()
        async with SandboxSession(config) as session:
            await session.run("import pandas as pd\npd.DataFrame({'a': [1, 2]}).a.sum()")
            samples.append((time.perf_counter() - started) * 1000)
    return sorted(samples[1:])[1]


async def first_result(folder: Path, pool: int) -> float:
    """Median ms from asking a server's session manager for a new session to its first result."""
    os.environ["UBERTOOL_HOME"] = str(folder / f"home-{pool}")
    from ubertool.runtime.policy import default_policy
    from ubertool.runtime.sessions import SessionManager

    policy = default_policy()
    policy = policy.model_copy(update={"sessions": policy.sessions.model_copy(update={"pool": pool})})
    samples = []
    async with SessionManager(policy).running() as manager:
        for _ in range(5):
            await anyio.sleep(1.0)  # the pool refills in the background
            started = time.perf_counter()
            async with manager.use(None, None) as (_, run):
                await run.cell("1 + 1")
            samples.append((time.perf_counter() - started) * 1000)
    return sorted(samples)[2]


async def per_session(folder: Path, count: int = 4) -> None:
    """Host memory per live session with pandas imported and its image kept."""
    before = rss_mib()
    async with AsyncExitStack() as stack:
        sessions = []
        for i in range(count):
            workspace = folder / f"ws-rss-{i}"
            workspace.mkdir()
            session = await stack.enter_async_context(SandboxSession(SandboxConfig(workspace=workspace)))
            await session.run("import pandas as pd\ndf = pd.DataFrame({'a': range(1000)})")
            await anyio.to_thread.run_sync(lambda s=session: s._maybe_image(force=True))
            session._measure()
            sessions.append(session)
        held = sum(s.host_bytes for s in sessions) / count / 2**20
        print(f"  per session (pandas imported, image kept): RSS +{(rss_mib() - before) / count:.0f} MiB; "
              f"counted in the budget {held:.0f} MiB")


async def resume_after_restart(folder: Path, cells: int) -> None:
    """A session saved to the store, then resumed in a new session: from its image vs by replay."""
    workspace = folder / "ws-saved"
    workspace.mkdir()
    root = folder / "root-saved"
    root.mkdir(mode=0o700)
    config = SandboxConfig(workspace=workspace, root=root, limits=Limits(timeout_s=60, restore_timeout_s=300))
    (folder / "sessions").mkdir(mode=0o700)
    store = SessionStore(folder / "sessions", folder / "sessions.key")
    async with SandboxSession(config) as session:
        await session.run("import random, pandas as pd")
        for i in range(cells - 1):
            await session.run(CELL.format(i=i))
        started = time.perf_counter()
        saved = await session.save()
        record = Record("s-" + "b" * 16, "run", "anyone", saved.through, saved.next_cell,
                        saved.clock_ns, 0, 0)
        store.save(record, saved.image)
        save_ms = (time.perf_counter() - started) * 1000
        history = tuple(PastCell(c.number, c.code, c.echo, c.status, c.exchanges, c.duration_s)
                        for c in session._history)
    size = (folder / "sessions" / f"{record.handle}.image").stat().st_size
    assert saved.image is not None
    for how in ("image", "replay"):
        started = time.perf_counter()
        image = store.image(record)[0] if how == "image" else None
        loaded = (time.perf_counter() - started) * 1000
        resume = Resume(history, image, saved.through, saved.next_cell, saved.clock_ns)
        async with SandboxSession(replace(config), resume=resume) as back:
            await back.run("1")
        total = (time.perf_counter() - started) * 1000
        extra = f" (load: MAC + zstd {loaded:.0f} ms)" if how == "image" else ""
        print(f"  resume after {cells} cells by {how}: {total:.0f} ms to a first result{extra}")
    print(f"  saved: {len(saved.image) >> 20} MiB image -> {size / 2**20:.1f} MiB on disk; "
          f"save {save_ms:.0f} ms")


async def bench(lengths: list[int], folder: Path) -> None:
    print(f"self-test: images {'on' if not engine.images_off() else 'off'}, "
          f"soft interrupts {'on' if not engine.soft_interrupts_off() else 'off'}")
    await image_cost(folder)
    warm = await pandas_ready(folder, ("numpy", "pandas", "matplotlib.pyplot"))
    cold = await pandas_ready(folder, ())
    print(f"  new session to a first pandas result: template {warm:.0f} ms   fresh {cold:.0f} ms")
    pooled, cold_first = await first_result(folder, 1), await first_result(folder, 0)
    print(f"  a server's new session to its first result: pool {pooled:.1f} ms   opened on demand "
          f"{cold_first:.1f} ms")
    await per_session(folder)
    print("a saved session resumed (as after a server restart)")
    await resume_after_restart(folder, 100)
    print("restore after a hard stop (sleep past the limit), seconds")
    for cells in lengths:
        image_s, image_cells = await restore_after(cells, folder, images=True)
        replay_s, replay_cells = await restore_after(cells, folder, images=False)
        print(f"  after {cells:4d} cells: image {image_s:7.3f} s ({image_cells} replayed)   "
              f"replay {replay_s:7.3f} s ({replay_cells} replayed)   ratio {replay_s / image_s:6.1f}x")
    print(f"process RSS at the end: {rss_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10, 100, 500])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(bench, args.cells, Path(folder))


if __name__ == "__main__":
    main()
