"""A session's folders packed to travel to another host (`ubertool.sandbox.carry`), attacked as
a guest would: what it leaves in its folders (links out, FIFOs, a tree too large) and a crafted
archive never reach the host outside the folders."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from ubertool.sandbox import carry


def _folders(tmp_path: Path, *names: str) -> dict[str, Path]:
    made = {name: tmp_path / name for name in names}
    for folder in made.values():
        folder.mkdir(mode=0o700, parents=True)
    return made


def test_files_folders_and_inner_links_travel(tmp_path: Path) -> None:
    here = _folders(tmp_path / "here", "workspace", "root")
    (here["workspace"] / "deep" / "er").mkdir(parents=True)
    (here["workspace"] / "deep" / "er" / "data.bin").write_bytes(bytes(range(256)) * 100)
    (here["root"] / "tmp").mkdir()
    (here["root"] / "tmp" / "held").write_text("abc")
    os.symlink("deep/er/data.bin", here["workspace"] / "link")
    packed = carry.pack(here)

    there = _folders(tmp_path / "there", "workspace", "root")
    carry.unpack(packed, there)
    assert (there["workspace"] / "deep" / "er" / "data.bin").read_bytes() == bytes(range(256)) * 100
    assert (there["root"] / "tmp" / "held").read_text() == "abc"
    assert os.readlink(there["workspace"] / "link") == "deep/er/data.bin"


def test_what_the_guest_planted_is_not_followed_read_or_made(tmp_path: Path) -> None:
    here = _folders(tmp_path, "workspace")
    secret = tmp_path / "host-secret"
    secret.write_text("host only")
    os.symlink(secret, here["workspace"] / "absolute")
    os.symlink("../host-secret", here["workspace"] / "climbing")
    os.mkfifo(here["workspace"] / "fifo")  # opening it would block the host: it is never opened

    done: list[bytes] = []
    worker = threading.Thread(target=lambda: done.append(carry.pack(here)), daemon=True)
    worker.start()
    worker.join(10)
    assert done, "packing blocked on the FIFO"
    assert b"host only" not in done[0]  # links are kept as links: their targets are never read

    there = _folders(tmp_path / "there", "workspace")
    carry.unpack(done[0], there)
    assert sorted(p.name for p in there["workspace"].iterdir()) == []  # links out and the FIFO dropped


def _archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.mode = kind, link, 0o644
    return member


def test_a_crafted_archive_writes_nothing_outside_its_folders(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    there = _folders(tmp_path, "workspace")
    crafted = _archive(
        (_member("workspace/../outside/climbed"), b"x"),
        (_member("/" + str(outside / "absolute").lstrip("/")), b"x"),
        (_member("workspace/door", tarfile.SYMTYPE, str(outside)), None),
        (_member("workspace/door/through-link"), b"x"),
        (_member("workspace/dev", tarfile.CHRTYPE), None),
        (_member("elsewhere/file"), b"x"),
        (_member("workspace/fine"), b"kept"),
    )
    carry.unpack(crafted, there)
    assert list(outside.iterdir()) == []
    kept = {p.name: p for p in there["workspace"].iterdir()}
    assert set(kept) <= {"fine", "door"} and not (there["workspace"] / "door").is_symlink()
    assert (there["workspace"] / "fine").read_bytes() == b"kept"


def test_folders_over_the_limit_are_not_packed(tmp_path: Path) -> None:
    here = _folders(tmp_path, "workspace")
    (here["workspace"] / "big").write_bytes(b"\0" * 4096)
    with pytest.raises(carry.NotCarried, match="more than"):
        carry.pack(here, limit=4096)
    assert len(carry.pack(here, limit=16384)) <= 16384


def test_no_member_is_written_through_a_link_the_archive_made(tmp_path: Path) -> None:
    """A jailed program swapping a folder for a link while the host packs gets a link member
    followed by members under it. Writing those follows the link; the `data` filter's check of
    where a link leads is fooled by a path longer than the host's PATH_MAX (CVE-2025-4517: in
    the Python this runs on, realpath stops resolving there), so a link it lets through leads
    two folders up, out of the run's folders."""
    there = _folders(tmp_path / "run", "workspace")
    steps, deep = "abcdefghijklmnop", "d" * 247
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    path = ""
    for step in steps:  # a/b/.../p is a short name for 16 folders of 247 characters
        members += [(_member(f"workspace/{path}{deep}", tarfile.DIRTYPE), None),
                    (_member(f"workspace/{path}{step}", tarfile.SYMTYPE, deep), None)]
        path += f"{deep}/"
    long_way = "/".join((*steps, "l" * 254))  # back up to the workspace, past PATH_MAX for realpath
    members += [(_member(f"workspace/{long_way}", tarfile.SYMTYPE, "/".join([".."] * len(steps))), None),
                (_member("workspace/door", tarfile.SYMTYPE, f"{long_way}/../.."), None),
                (_member("workspace/door/planted"), b"host file")]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            member.size = len(data or b"")
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    carry.unpack(buffer.getvalue(), there)
    assert not (tmp_path / "planted").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_many_empty_files_and_links_count_against_the_limit(tmp_path: Path) -> None:
    """Each member costs the archive a header (two, with a long name or link), files or not: a
    guest's million empty files or long links must not grow the archive past the limit."""
    here = _folders(tmp_path, "workspace")
    for n in range(300):
        (here["workspace"] / f"{n:03}{'e' * 200}").touch()
        os.symlink("t" * 1000, here["workspace"] / f"{n:03}{'l' * 200}")
    with pytest.raises(carry.NotCarried, match="more than"):
        carry.pack(here, limit=2**20)



@pytest.mark.skipif(os.geteuid() != 0, reason="plays a host user a folder is closed to: root switches")
def test_a_folder_that_cannot_be_walked_is_not_left_out_silently(tmp_path: Path) -> None:
    """A folder the host cannot open (a jailed program, running as the host's user, took its
    permissions away) fails the pack: an archive without its files would resume the session
    with them silently gone."""
    here = _folders(tmp_path, "workspace")
    (here["workspace"] / "locked").mkdir()
    (here["workspace"] / "locked" / "kept").write_text("locked away")
    for path in (here["workspace"], here["workspace"] / "locked", here["workspace"] / "locked" / "kept"):
        os.chown(path, 65534, 65534)
    (here["workspace"] / "locked").chmod(0)
    packing = ("import os, sys; from pathlib import Path; from ubertool.sandbox import carry\n"
               "os.chdir(sys.argv[1]); os.setgid(65534); os.setuid(65534)\n"
               "try:\n    packed = carry.pack({'workspace': Path('.')})\n"
               "except carry.NotCarried:\n    sys.exit(3)\n"
               "sys.exit(0 if b'locked away' in packed else 4)\n")
    done = subprocess.run([sys.executable, "-c", packing, str(here["workspace"])], check=False)
    assert done.returncode == 3  # the host, not root, cannot read it: none of it, not part


def test_hard_links_in_a_folder_stay_one_file(tmp_path: Path) -> None:
    """The guest links a file under two names (WASI `path_link`): after the move, a write
    through one name must still show through the other, not land in a silent copy."""
    here = _folders(tmp_path / "here", "workspace", "root")
    (here["workspace"] / "sub").mkdir()
    (here["workspace"] / "data").write_text("shared")
    os.link(here["workspace"] / "data", here["workspace"] / "sub" / "same")
    os.link(here["workspace"] / "data", here["root"] / "copy")  # across folders: a copy there
    there = _folders(tmp_path / "there", "workspace", "root")
    carry.unpack(carry.pack(here), there)
    data, same = there["workspace"] / "data", there["workspace"] / "sub" / "same"
    assert data.stat().st_ino == same.stat().st_ino and same.read_text() == "shared"
    assert (there["root"] / "copy").read_text() == "shared"


def test_a_hard_link_to_what_was_left_out_is_left_out(tmp_path: Path) -> None:
    there = _folders(tmp_path, "workspace")
    os.symlink(tmp_path, there["workspace"] / "door")
    (tmp_path / "host-file").write_text("host")
    crafted = _archive((_member("workspace/door/host-file"), b"x"),
                       (_member("workspace/taken", tarfile.LNKTYPE, "workspace/door/host-file"), None),
                       (_member("workspace/missing", tarfile.LNKTYPE, "workspace/nowhere"), None))
    carry.unpack(crafted, there)
    assert sorted(p.name for p in there["workspace"].iterdir()) == ["door"]
    assert (tmp_path / "host-file").read_text() == "host" and (tmp_path / "host-file").stat().st_nlink == 1
