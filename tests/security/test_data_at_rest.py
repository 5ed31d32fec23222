"""Data at rest is private: the state folder and everything ubertool keeps in it are readable by
their owner only, whatever the umask; a loose old folder is tightened; world-writable grants
are refused."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_env, ubertool_command

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import PolicyError, load_policy, parse_policy
from ubertool.runtime.runs import open_run, playbooks_home

pytestmark = pytest.mark.anyio


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def open_to_others(root: Path) -> list[str]:
    """Every path under `root` (itself included) that group or others may use."""
    found = [root, *sorted(root.rglob("*"))]
    return [f"{p} {mode(p):04o}" for p in found if not p.is_symlink() and mode(p) & 0o077]


def ubertool(*args: str, umask: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ubertool_command(), *args], capture_output=True, text=True, timeout=300,
                          env=cli_env(**env), preexec_fn=lambda: os.umask(umask))


async def test_every_kind_of_file_is_owner_only_under_umask_0000(_isolated_home: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 permissive_umask: None) -> None:
    home = _isolated_home / "state"  # made by ubertool, not by the test
    monkeypatch.setenv("UBERTOOL_HOME", str(home))
    policy = tmp_path / "keep.toml"
    policy.write_text("[workspace]\nkeep = true\n[limits]\nreply_bytes = 256\n")
    with Journal(default_journal_path()) as journal:
        async with open_run(load_policy(policy), journal=journal) as run:
            await run.cell("x = 1")
            await run.cell("import ubertool\nubertool.save_playbook('p', 'd')")
            files = {
                "state folder": (home, 0o700), "journal": (home / "journal.sqlite", 0o600),
                "journal wal": (home / "journal.sqlite-wal", 0o600),
                "journal shm": (home / "journal.sqlite-shm", 0o600),
                "runs folder": (home / "runs", 0o700), "run folder": (run.audit.path.parent, 0o700),
                "audit log": (run.audit.path, 0o600), "workspace": (run.workspace, 0o700),
                "playbooks folder": (playbooks_home(), 0o700), "playbook": (playbooks_home() / "p.py", 0o700),
                "recording": (playbooks_home() / "p.recording.json", 0o600),
            }
            for label, (path, expected) in files.items():
                assert path.exists(), label
                assert mode(path) == expected, f"{label}: {mode(path):04o}"


def test_the_command_keeps_everything_owner_only_even_what_cells_write(_isolated_home: Path,
                                                                       tmp_path: Path) -> None:
    policy = tmp_path / "keep.toml"
    policy.write_text("[workspace]\nkeep = true\n[limits]\noutput_bytes = 1024\n")
    done = ubertool("run", "--policy", str(policy), "-c",
                    "import os\nopen('/workspace/made-by-the-cell.txt', 'w').write('x')\n"
                    "os.mkdir('/workspace/folder')\nprint('y' * 5000)")
    assert done.returncode == 0, done.stderr
    assert list(_isolated_home.rglob("made-by-the-cell.txt"))
    assert open_to_others(_isolated_home) == []
    out = tmp_path / "shared" / "p.py"
    run_id = ubertool("sessions", "list").stdout.splitlines()[1].split()[0]
    assert ubertool("sessions", "dump", run_id, "-o", str(out)).returncode == 0
    assert (mode(out), mode(out.with_name("p.recording.json"))) == (0o700, 0o600)
    assert ubertool("sessions", "dump", run_id, "-o", str(out), "--mode", "755").returncode == 0
    assert (mode(out), mode(out.with_name("p.recording.json"))) == (0o755, 0o644)


def test_a_loose_state_folder_is_tightened_with_one_line(_isolated_home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "not-ubertools.txt"
    outside.write_text("someone else's")
    outside.chmod(0o644)
    _isolated_home.chmod(0o755)
    (_isolated_home / "journal.sqlite").write_text("")
    (_isolated_home / "journal.sqlite").chmod(0o644)
    (_isolated_home / "runs" / "old").mkdir(parents=True, mode=0o755)
    (_isolated_home / "runs" / "old" / "audit.jsonl").write_text("{}\n")
    (_isolated_home / "runs" / "old" / "audit.jsonl").chmod(0o664)
    (_isolated_home / "runs" / "old" / "link").symlink_to(outside)  # as a guest could leave in a workspace

    done = ubertool("policy", "show")
    assert done.returncode == 0
    said = [line for line in done.stderr.splitlines() if "open to other users" in line]
    assert len(said) == 1 and "(mode 0755)" in said[0] and str(_isolated_home) in said[0]
    assert open_to_others(_isolated_home) == []
    assert mode(outside) == 0o644  # a link was not followed
    again = ubertool("policy", "show")
    assert "open to other users" not in again.stderr


@pytest.mark.parametrize("section", ["[[grants]]\nguest = '/data'",
                                     "[[mounts]]\nkind = 'dir'\nname = 'd'\nguest = '/data'"])
def test_a_world_writable_folder_is_refused_unless_intended(tmp_path: Path, section: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    policy = tmp_path / "policy.toml"
    policy.write_text(f"{section}\nhost = '{shared}'\n")
    key = "grants.0" if "grants" in section else "mounts.0"
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert f"{key}.host: '{shared}' is writable by every user of this machine (mode 0777)" in str(refused.value)
    assert f"set {key}.world_writable = true if that is intended" in str(refused.value)
    checked = ubertool("policy", "check", str(policy))
    assert checked.returncode == 2 and "writable by every user" in checked.stderr
    policy.write_text(f"{section}\nhost = '{shared}'\nworld_writable = true\n")
    assert load_policy(policy).source == str(policy)
    shared.chmod(0o755)
    assert parse_policy({"grants": [{"host": str(shared), "guest": "/data"}]}, "x", None).grants
