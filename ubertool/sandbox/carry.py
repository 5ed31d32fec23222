"""A session's own folders (its workspace and private root) as one archive, to carry a saved
session to another host (`SandboxSession.save(carry=True)`, then `Resume.files` there).

Everything in those folders is the guest's, or a jailed program's: hostile. Packing walks by
folder descriptor (`os.fwalk`: a folder swapped for a link meanwhile is not followed) and
opens no file through a link; it takes folders, regular files (a hard link within one folder
as one file) and links (as links: their targets are never read), and nothing else (no FIFO is
opened, no device read), and stops at `limit` bytes of archive (headers count too).
Unpacking takes only what `tarfile`'s `data` filter allows (no absolute or escaping path, no
link leading out, no device, no set-id bit) and never writes through a link (the filter's own
check of links can be fooled, and a program swapping a folder for a link while the host packs
puts members under a link): it drops any other member.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

CARRY_LIMIT = 256 * 2**20  # bytes of archive; a session holding more resumes elsewhere by replay
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class NotCarried(Exception):
    """The folders could not be packed (too large, too deep, unreadable); the message says why."""


def pack(folders: dict[str, Path], limit: int = CARRY_LIMIT) -> bytes:
    """The `folders` (archive name -> host folder) as one uncompressed tar.

    Raises:
        NotCarried: their archive would take more than `limit` bytes, or a folder could not be walked
            or a file read (a tree deeper than the host's paths, a file cut while read).
    """
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, folder in folders.items():
                tar.addfile(_member(name, tarfile.DIRTYPE, 0o700))
                packed: dict[tuple[int, int], str] = {}  # a file's (device, inode) -> its first name here
                for top, dirs, files, dir_fd in os.fwalk(folder, onerror=_fail):
                    relative = os.path.relpath(top, folder)
                    prefix = name if relative == "." else f"{name}/{relative}"
                    for entry in (*dirs, *files):
                        _add(tar, f"{prefix}/{entry}", entry, dir_fd, limit, packed)
    except (OSError, RecursionError, tarfile.TarError) as exc:
        raise NotCarried(f"its folders could not be packed ({type(exc).__name__}: {exc})") from None
    return buffer.getvalue()


def _fail(error: OSError) -> None:
    """A folder that cannot be opened fails the pack (`os.fwalk` would leave it out silently)."""
    raise error


def _add(tar: tarfile.TarFile, path: str, entry: str, dir_fd: int, limit: int,
         packed: dict[tuple[int, int], str]) -> None:
    """Add one entry of the folder open at `dir_fd`, the archive staying within `limit` bytes
    (headers count: a million empty files cost as much as a large one). A file `packed`
    already under another name of the same folder (a hard link) is added as a link to it."""
    st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        tar.addfile(_member(path, tarfile.DIRTYPE, st.st_mode, st.st_mtime))
    elif stat.S_ISLNK(st.st_mode):
        link = _member(path, tarfile.SYMTYPE, 0o777, st.st_mtime)
        link.linkname = os.readlink(entry, dir_fd=dir_fd)
        tar.addfile(link)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(entry, _OPEN, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped since the look: not a file to read
                return
            if (first := packed.get((st.st_dev, st.st_ino))) is not None:
                link = _member(path, tarfile.LNKTYPE, st.st_mode, st.st_mtime)
                link.linkname = first
                tar.addfile(link)
                return
            if st.st_nlink > 1:
                packed[st.st_dev, st.st_ino] = path
            if tar.offset + st.st_size > limit:
                raise NotCarried(f"its folders take more than {limit / 2**20:g} MiB to pack")
            member = _member(path, tarfile.REGTYPE, st.st_mode, st.st_mtime)
            member.size = st.st_size
            tar.addfile(member, file)
    if tar.offset > limit:
        raise NotCarried(f"its folders take more than {limit / 2**20:g} MiB to pack")


def _member(path: str, kind: bytes, mode: int, mtime: float = 0.0) -> tarfile.TarInfo:
    member = tarfile.TarInfo(path)
    member.type, member.mode, member.mtime = kind, stat.S_IMODE(mode) & 0o7777, int(mtime)
    return member


def unpack(data: bytes, folders: dict[str, Path]) -> None:
    """Write what `pack` made into `folders` (archive name -> host folder, each existing): a
    member under no named folder, one the `data` filter refuses, or one whose writing would
    follow a link is left out.

    Raises:
        OSError, tarfile.TarError: the archive is not one, or a member could not be written.
    """
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        for name, folder in folders.items():
            inside = [m.replace(name=m.name[len(name) + 1:], linkname=_within(m, name), deep=False)
                      for m in members if m.name.startswith(f"{name}/")]
            tar.extractall(folder, members=inside, filter=_data_only)


def _within(member: tarfile.TarInfo, name: str) -> str:
    """A hard link's other name, as the member's is: within the folder `name` (else refused)."""
    if not member.islnk():
        return member.linkname
    return member.linkname[len(name) + 1:] if member.linkname.startswith(f"{name}/") else "/"


def _data_only(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
    try:
        member = tarfile.data_filter(member, destination)
    except tarfile.FilterError:
        return None
    if _through_link(Path(destination), member.name):
        return None
    if member.islnk() and (_through_link(Path(destination), member.linkname)
                           or not stat.S_ISREG(_lstat_mode(Path(destination, member.linkname)))):
        return None  # a hard link only to a file already written here
    return member


def _through_link(destination: Path, name: str) -> bool:
    """Whether writing `name` below `destination` would follow a link already there: one on its
    way, or one in its place. Raises OSError when that cannot be told (a path too long)."""
    path = destination
    for part in Path(name).parts:
        path = path / part
        if stat.S_ISLNK(_lstat_mode(path)):
            return True
    return False


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0
