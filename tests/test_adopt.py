"""A session taken on elsewhere (`SandboxSession.adopt`): the completed cells of a session that
ran on another node, replayed in a new interpreter with a new workspace, as `--cluster` does
when a node is lost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from ubertool.sandbox import SandboxConfig, SandboxSession, Status

pytestmark = pytest.mark.anyio


def elsewhere(config: SandboxConfig, tmp_path: Path) -> SandboxConfig:
    """The same limits with a new, empty workspace: another node's."""
    workspace = tmp_path / "other-node"
    workspace.mkdir()
    return replace(config, workspace=workspace)


async def test_adopted_cells_rebuild_the_state_and_the_files(make_config: Callable[..., SandboxConfig],
                                                             tmp_path: Path) -> None:
    history = [(1, "x = 41\nopen('/workspace/a.txt', 'w').write('A')", Status.OK, ()),
               (2, "x += 1", Status.OK, ()),
               (3, "1 / 0", Status.ERROR, ())]
    config = elsewhere(make_config(), tmp_path)
    async with SandboxSession(config) as session:
        report = await session.adopt(history, next_cell=5)
        assert report.ok and report.cells == 3, report
        result = await session.run("x, open('/workspace/a.txt').read()")
    assert str(result.value) == "(42, 'A')" and result.cell == 5
    assert (config.workspace / "a.txt").read_text() == "A"  # written once, by the replay, and kept


async def test_a_cell_that_diverges_on_adoption_is_reported(make_config: Callable[..., SandboxConfig],
                                                            tmp_path: Path) -> None:
    history = [(1, "y = 1", Status.OK, ()), (2, "1 / 0", Status.OK, ())]
    async with SandboxSession(elsewhere(make_config(), tmp_path)) as session:
        report = await session.adopt(history, next_cell=3)
        assert not report.ok and report.failed_at == 2, report
        assert str((await session.run("y")).value) == "1"
