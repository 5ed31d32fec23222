"""What a sandbox session is given: its limits, its workspace and its read-only grants.

The runtime builds these from the policy; the sandbox never reads a policy itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """Bounds on one session and each of its cells.

    `timeout_s` is a cell's default wall-clock limit (a call may pass a shorter or longer one;
    the runtime caps it). `memory_bytes` bounds the interpreter's whole memory for the session.
    `output_bytes` bounds each stream of each cell (head and tail are kept); `code_bytes` the
    source of one cell. `restore_timeout_s` bounds each cell replayed by a restore.
    """

    timeout_s: float = 30.0
    memory_bytes: int = 1024 * 2**20
    output_bytes: int = 2**20
    code_bytes: int = 2**20
    restore_timeout_s: float = 300.0


@dataclass(frozen=True)
class ReadOnlyGrant:
    """A host folder the guest sees, read-only, at `guest` (an absolute guest path)."""

    host: Path
    guest: str


@dataclass(frozen=True)
class SandboxConfig:
    """Everything one session needs.

    `workspace` is the host folder the guest sees, writable, at `workspace_guest`; it must
    exist. Nothing else of the host is visible but `grants`. `about` is what the guest's
    `ubertool.about()` prints: the folders and limits, in words for the code's author.
    """

    workspace: Path
    workspace_guest: str = "/workspace"
    grants: tuple[ReadOnlyGrant, ...] = ()
    limits: Limits = field(default_factory=Limits)
    about: str = ""
