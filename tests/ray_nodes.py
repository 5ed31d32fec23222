"""Ray nodes on loopback for the cluster tests and bench/cluster.py: each `ray start` the leader
of a process group of its own, ended by that group (never `ray stop`, which ends every Ray on
the machine: another test's or bench's too)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def start_ray(ray: Path, *args: str, env: dict[str, str]) -> int:
    """Run `ray ARGS` (e.g. `start --head ...`) as the leader of a new process group (what it
    starts stays in that group); the group's id.

    Raises:
        RuntimeError: `ray` failed (with the end of what it said).
    """
    proc = subprocess.Popen([str(ray), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    _, err = proc.communicate(timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray {args[0]} failed: {err.decode(errors='replace')[-2000:]}")
    return proc.pid


def kill_group(pgid: int) -> None:
    """SIGKILL process group `pgid` and every process descended from it (Ray puts its actors'
    worker processes in process groups of their own): a node lost at once."""
    listing = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True, check=True)
    table = [[int(field) for field in line.split()] for line in listing.stdout.splitlines()]
    doomed = {pid for pid, _, group in table if group == pgid}
    while grown := {pid for pid, ppid, _ in table if ppid in doomed} - doomed:
        doomed |= grown
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
