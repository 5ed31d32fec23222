"""The bubblewrap jail every program starts in (unless its policy says `jail = "none"`).

A jailed program sees: the system folders read-only (`/usr` and the `/bin`, `/lib*` links or
folders beside it), a few non-secret files of `/etc`, the operator's extra read-only binds, its
own folder of the workspace read-write at `/workspace/<cwd>`, a private `/proc` and minimal
`/dev`, and small private tmpfs at `/tmp` and at its HOME. Nothing else of the host exists for it,
so a link the guest planted resolves in that view only. It has its own user (nested user
namespaces disabled), PID, IPC, UTS and cgroup namespaces, no network unless its policy says
`network = true`, no capabilities (even when ubertool runs as root) and no new privileges, and
it is killed when the thread that started it (a broker's own, long-lived) or ubertool ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

JAIL_WORKSPACE = "/workspace"  # where the program's folder of the workspace appears
JAIL_HOME = "/home/ubertool"  # an empty tmpfs
JAIL_PATH = "/usr/local/bin:/usr/bin:/bin"
# Places the jail makes itself: an operator's read-only bind may not cover them, nor lie in the
# first three (a bind in /tmp or HOME is shown inside the private tmpfs).
_JAIL_OWN = ("/proc", "/dev", JAIL_WORKSPACE, "/tmp", JAIL_HOME)

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What of /etc a program needs to link, name users and tell the time; never secrets (shadow,
# ssh keys, sudoers, credentials). The operator binds more with `ro_binds`.
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
        "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
# What a program with `network = true` needs to resolve names and check certificates (not all
# of /etc/ssl: its private/ is readable to a jailed program when ubertool runs as root).
_ETC_NETWORK = ("/etc/resolv.conf", "/etc/hosts", "/etc/host.conf", "/etc/gai.conf",
                "/etc/services", "/etc/protocols", "/etc/ssl/certs", "/etc/ssl/openssl.cnf",
                "/etc/ca-certificates", "/etc/ca-certificates.conf")
_PROBE_TIMEOUT_S = 10.0


def bind_problem(path: str) -> str:
    """What is wrong with `path` as an operator's read-only bind ("" if nothing)."""
    if not path.startswith("/") or path != posixpath.normpath(path) or path.startswith("//") or path == "/":
        return f"{path!r}: an absolute, normalized host path below '/', such as '/opt/tool'"
    for own in _JAIL_OWN:
        if path == own or own.startswith(path + "/"):
            return f"{path!r} would cover {own!r}, which the jail makes itself"
    for own in _JAIL_OWN[:3]:
        if path.startswith(own + "/"):
            return f"{path!r} lies in {own!r}, which the jail makes itself"
    return ""


def jail_folder(cwd: str) -> str:
    """Where a program's folder `cwd` (relative to the workspace, "" for all of it) appears."""
    return "/".join((JAIL_WORKSPACE, *Path(cwd).parts))


def bwrap_command(bwrap: str, argv: Sequence[str], *, folder_fd: int, folder: str,
                  env: Mapping[str, str], network: bool, ro_binds: Sequence[str],
                  tmp_bytes: int) -> list[str]:
    """The bwrap command line that runs `argv` in a jail.

    Args:
        bwrap: The bubblewrap executable.
        argv: The program and its arguments, as they run inside (found on `env["PATH"]`).
        folder_fd: An open descriptor of the host folder shown read-write at `folder` (it must
            reach the child: pass it in `pass_fds`); bwrap mounts what the descriptor names,
            so a link swapped in after it was opened changes nothing.
        folder: Where inside the jail, e.g. "/workspace/db"; also the program's working folder.
        env: The program's whole environment (nothing of bwrap's own is passed on).
        network: Share the host's network (and the /etc files naming it) instead of none.
        ro_binds: Absolute host paths shown read-only at the same place.
        tmp_bytes: The size of each private tmpfs (/tmp and HOME).
    """
    # No --new-session: the program's terminal is its own pty from pexpect, so TIOCSTI can only
    # type into its own input; a new session would cost it Ctrl-C (sendintr) and /dev/tty.
    command = [bwrap, "--die-with-parent",
               "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
               "--unshare-uts", "--hostname", "ubertool", "--unshare-cgroup-try",
               *([] if network else ["--unshare-net"]),
               "--cap-drop", "ALL"]
    for path in _SYSTEM:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    for path in (*_ETC, *(_ETC_NETWORK if network else ())):
        command += ["--ro-bind-try", path, path]
    command += ["--proc", "/proc", "--dev", "/dev",
                "--size", str(tmp_bytes), "--tmpfs", "/tmp",
                "--size", str(tmp_bytes), "--tmpfs", JAIL_HOME]
    for path in ro_binds:
        command += ["--ro-bind", path, path]
    command += ["--bind-fd", str(folder_fd), folder,
                "--remount-ro", "/",
                "--chdir", folder, "--clearenv"]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return [*command, "--", *argv]


def jail_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A jailed program's environment: the fixed few, then the policy's `env` over them."""
    return {"PATH": JAIL_PATH, "HOME": JAIL_HOME, "LANG": "C.UTF-8", "TERM": "dumb", **extra}


def open_folder(root: Path, cwd: str) -> int:
    """Open (making what is missing) `root/cwd` without following any link on the way.

    Returns a descriptor the caller closes.

    Raises:
        OSError: a step is a link or not a folder (ELOOP, ENOTDIR), or making it failed.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in Path(cwd).parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            fd, parent = os.open(part, flags, dir_fd=fd), fd
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def bwrap_executable() -> str:
    """bubblewrap as found on ubertool's own PATH ("" when it is not there)."""
    return shutil.which("bwrap") or ""


def bwrap_problem() -> str:
    """Why bubblewrap cannot jail a program here ("" when it can); probed once per process."""
    return _probe(bwrap_executable())


@functools.cache
def _probe(bwrap: str) -> str:
    if not bwrap:
        return "bubblewrap is not installed: install bubblewrap (Debian: apt-get install bubblewrap)"
    with tempfile.TemporaryDirectory(prefix="ubertool-probe-") as folder:
        fd = open_folder(Path(folder), "")
        try:
            done = subprocess.run(
                bwrap_command(bwrap, ["true"], folder_fd=fd, folder=JAIL_WORKSPACE, env=jail_env({}),
                              network=False, ro_binds=(), tmp_bytes=2**20),
                pass_fds=(fd,), capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bubblewrap ({bwrap}) did not run: {exc}"
        finally:
            os.close(fd)
    if done.returncode == 0:
        return ""
    said = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    return (f"bubblewrap ({bwrap}) cannot make a jail here ({said[0]}): enable user namespaces "
            "(sysctl user.max_user_namespaces > 0 and, where it exists, "
            "kernel.unprivileged_userns_clone=1), or run ubertool where they are allowed")
