"""What a sandbox session is given: limits, workspace, host folders, mounts and the recorder.

The runtime builds these from the policy; the sandbox never reads a policy itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ubertool.tools.mounts import Provider
from ubertool.tools.recorder import Recorder


@dataclass(frozen=True)
class Limits:
    """Bounds on one session and each of its cells.

    `timeout_s` is a cell's default wall-clock limit (a call may pass a shorter or longer one;
    the runtime caps it). `memory_bytes` bounds the interpreter's whole memory for the session.
    `output_bytes` bounds each stream of each cell (head and tail are kept); `code_bytes` the
    source of one cell. `restore_timeout_s` bounds each cell replayed by a restore.
    `open_files` bounds the files a session holds open at once, `tool_calls` the host-tool
    calls of one cell. A cell that leaves the workspace over `workspace_bytes` fails (checked
    when it ends; the files stay, for the code to delete).
    """

    timeout_s: float = 30.0
    memory_bytes: int = 1024 * 2**20
    output_bytes: int = 2**20
    code_bytes: int = 2**20
    restore_timeout_s: float = 300.0
    open_files: int = 256
    tool_calls: int = 1000
    workspace_bytes: int | None = None


@dataclass(frozen=True)
class HostFolder:
    """A host folder the guest sees at `guest` (an absolute guest path), read-only unless
    `writable`. A writable one is set aside during a restore, as the workspace is."""

    host: Path
    guest: str
    writable: bool = False


@dataclass(frozen=True)
class ProviderMount:
    """Files served by a provider (`ubertool.tools.mounts`) at `guest`."""

    guest: str
    provider: Provider
    writable: bool = False


@dataclass(frozen=True)
class SandboxConfig:
    """Everything one session needs.

    `workspace` is the host folder the guest sees, writable, at `workspace_guest`; it must
    exist. Nothing else of the host is visible but `folders` and `mounts`. Every provider
    request goes through `recorder`, so a restore replays it instead of sending it again.
    `tools` are host functions the guest calls as `from host import tools` (typed plain
    functions; each should record itself through `recorder`). `about` is what the guest's
    `ubertool.about()` prints. `import_path` are guest paths, each inside a read-only folder,
    put on the guest's `sys.path` after the stdlib and the guest library (never before them).
    `template` names modules a new session finds already imported: the first session of a
    configuration imports them once into a template image, later ones start from a copy of it
    (reseeded), when session images are on; () for none. `root` is the host folder the guest
    sees as `/` (its /tmp and HOME): an empty owner-only folder that its giver keeps (so a
    saved session finds it again) and removes; None: a temporary one, removed at the close.
    `keep_images`: take a session image after cells that would be slow to replay (when images
    are on), so that a restore replays only the cells after it; False for a session that is
    never restored (a playbook's replay ends at its first failed cell): a restore, if one comes
    all the same, replays every cell.
    """

    workspace: Path
    workspace_guest: str = "/workspace"
    folders: tuple[HostFolder, ...] = ()
    mounts: tuple[ProviderMount, ...] = ()
    recorder: Recorder = field(default_factory=Recorder)
    tools: tuple[Callable[..., Any], ...] = ()
    limits: Limits = field(default_factory=Limits)
    about: str = ""
    import_path: tuple[str, ...] = ()
    template: tuple[str, ...] = ()
    root: Path | None = None
    keep_images: bool = True
