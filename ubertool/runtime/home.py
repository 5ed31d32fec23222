"""Where ubertool keeps its state on the host: `$UBERTOOL_HOME`, else the user's state folder.

The state folder and everything ubertool puts in it are readable by their owner only (see
`tools.files`): it holds every cell's code and output and bodies fetched with credentials.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ubertool.tools.files import private_folder, tighten


def state_home() -> Path:
    """The state folder (not created here): `$UBERTOOL_HOME`, else `$XDG_STATE_HOME/ubertool`,
    else `~/.local/state/ubertool`. No part of it is ever granted to a guest."""
    explicit = os.environ.get("UBERTOOL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "ubertool"


def state_folder(*parts: str) -> Path:
    """`<state folder>/<parts...>`, the state folder and each part made owner-only (0700) if
    missing (the state folder's own parents are made as usual).

    Raises:
        OSError: a folder cannot be made, or one of them is a link.
    """
    path = state_home()
    path.parent.mkdir(parents=True, exist_ok=True)
    private_folder(path)
    for part in parts:
        path = private_folder(path / part)
    return path


def tighten_state_home(say: Callable[[str], None]) -> None:
    """If the state folder is open to other users (an older ubertool made it so, or someone
    chmod-ed it), make it and what it holds owner-only, and `say` one line about it."""
    home = state_home()
    tighten(home, lambda old: say(f"ubertool: {home} was open to other users (mode {old:04o}); made it and "
                                  "everything in it owner-only (it holds code, outputs and fetched data)"))
