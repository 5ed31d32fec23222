"""Files the host writes: owner-only, and never through a link the guest planted.

Everything ubertool keeps (the state folder, journal, audit logs, workspaces, playbooks) may hold
code, outputs and bodies fetched with credentials, so it is created readable by its owner only
(folders 0700, files 0600), whatever the process umask.

The guest may create relative links in its workspace (`x -> ..`); a host that then writes to
`workspace/x` would write outside it. `write_no_follow` never follows a link in the last two
steps.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600


def cache_home() -> Path:
    """ubertool's cache folder (not created here): `$UBERTOOL_CACHE`, else
    `$XDG_CACHE_HOME/ubertool`, else `~/.cache/ubertool`. It holds what can be fetched again
    (package wheels); parts of it are granted read-only to guests, so it never holds state."""
    explicit = os.environ.get("UBERTOOL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ubertool"


def private_folder(path: Path) -> Path:
    """Make `path` (and missing parents) if needed and set it to 0700; returns it.
    Only for folders ubertool owns: an existing one is chmod-ed.

    Raises:
        OSError: it cannot be made, or is a link.
    """
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    try:
        os.fchmod(fd, FOLDER_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """`os.open(path, flags | O_CREAT)` with exactly `mode` (0600 by default) whatever the
    umask, never through a link at `path`; returns the descriptor.

    Raises:
        OSError: `path` is a link, or cannot be opened.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_whole(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a 0600 temporary beside it, synced, renamed into place.

    Raises:
        OSError: it cannot be written (the temporary is removed).
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = open_private(temporary, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def iter_tree(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every entry below `root`, links not followed, without recursion, so a guest's deep tree
    cannot exhaust the host's stack.

    Raises:
        OSError: a folder cannot be read, e.g. a path longer than the host allows (ENAMETOOLONG).
    """
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                yield entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it, at any depth, never following a link and never
    leaving its filesystem (GNU `rm`, which walks by descriptor: no depth or path-length limit).
    A missing `path` is fine.

    Raises:
        OSError: something could not be removed (with rm's words).
    """
    if not os.path.lexists(path):
        return
    done = subprocess.run([shutil.which("rm") or "/bin/rm", "-rf", "--one-file-system", "--", str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if done.returncode or os.path.lexists(path):
        raise OSError(f"could not remove {path}: {done.stderr.strip() or f'rm exited {done.returncode}'}")


def tighten(root: Path, on_change: Callable[[int], None] | None = None) -> bool:
    """Take group and other permissions off `root` and everything under it, never following a
    link; calls `on_change(old_mode)` once if `root` itself was looser than 0700. Returns
    whether `root` was. A missing `root` is left missing."""
    try:
        loose = os.lstat(root).st_mode & 0o077
    except FileNotFoundError:
        return False
    if not loose:
        return False
    if on_change is not None:
        on_change(os.lstat(root).st_mode & 0o7777)
    with contextlib.suppress(OSError):  # a folder too deep to read is left as it is
        for name in (str(root), *(entry.path for entry in iter_tree(root))):
            with contextlib.suppress(OSError):  # a link (ELOOP), or gone meanwhile: leave it
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
                try:
                    os.fchmod(fd, os.fstat(fd).st_mode & 0o7700)
                finally:
                    os.close(fd)
    return True


def write_no_follow(folder: Path, name: str, data: bytes) -> None:
    """Write `folder/name` (making `folder` if missing) owner-only, without following any link
    and without opening anything the guest made there: the bytes go to a new file of a random
    name, which then takes `name`'s place (so a FIFO or device the guest planted at `name` is
    replaced, never opened, and cannot block the host).

    Raises:
        OSError: `folder` is a link, `name` is a folder, or the write failed.
    """
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=FOLDER_MODE)
    folder_fd = os.open(folder, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_NONBLOCK)
    try:
        temporary = f".{name}.{os.urandom(6).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, FILE_MODE, dir_fd=folder_fd)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.rename(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder_fd)
            raise
    finally:
        os.close(folder_fd)
