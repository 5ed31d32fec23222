"""Session images: restore after a hard stop, from an image vs by replay, in the same run.

For each history length, two sessions run the same cells (each a few ms of guest work, plus
an import of pandas first, so memory is not trivial); then one cell sleeps past its limit (only
the hard stop ends it) and the restore's time is printed beside replay's. Also printed: the
cost of one image (copy + open-file offsets), its size, the process RSS, and a new session's
time to a first pandas result from a warm template vs fresh. Asserts nothing.

    .venv/bin/python bench/images.py [--cells 10 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio

from ubertool.sandbox import Limits, SandboxConfig, SandboxSession, engine


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


async def bench(lengths: list[int], folder: Path) -> None:
    print(f"self-test: images {'on' if not engine.images_off() else 'off'}, "
          f"soft interrupts {'on' if not engine.soft_interrupts_off() else 'off'}")
    await image_cost(folder)
    warm = await pandas_ready(folder, ("numpy", "pandas", "matplotlib.pyplot"))
    cold = await pandas_ready(folder, ())
    print(f"  new session to a first pandas result: template {warm:.0f} ms   fresh {cold:.0f} ms")
    print("restore after a hard stop (sleep past the limit), seconds")
    for cells in lengths:
        image_s, image_cells = await restore_after(cells, folder, images=True)
        replay_s, replay_cells = await restore_after(cells, folder, images=False)
        print(f"  after {cells:4d} cells: image {image_s:7.3f} s ({image_cells} replayed)   "
              f"replay {replay_s:7.3f} s ({replay_cells} replayed)   ratio {replay_s / image_s:6.1f}x")
    print(f"process RSS at the end: {rss_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(bench, args.cells, Path(folder))


if __name__ == "__main__":
    main()
