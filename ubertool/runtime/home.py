"""Where ubertool keeps its state on the host: `$UBERTOOL_HOME`, else the user's state folder."""

from __future__ import annotations

import os
from pathlib import Path


def state_home() -> Path:
    """The state folder (not created here): `$UBERTOOL_HOME`, else `$XDG_STATE_HOME/ubertool`,
    else `~/.local/state/ubertool`. No part of it is ever granted to a guest."""
    explicit = os.environ.get("UBERTOOL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "ubertool"
