"""The `ubertool` command, run as a user runs it: a real process, a real terminal for the shell."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from conftest import cli_env, ubertool_command

UBERTOOL = ubertool_command()


def ubertool(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UBERTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=cli_env(), cwd=cwd)


def test_version() -> None:
    done = ubertool("--version")
    assert (done.returncode, done.stdout) == (0, "ubertool, version 0.1.0\n")


def test_run_code_prints_as_the_guest_printed() -> None:
    done = ubertool("run", "-c", "import sys\nprint('hello')\nprint('warn', file=sys.stderr)\n42")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello\n42\n", "warn\n")  # -c shows the value


def test_policy_check_takes_the_file_either_way(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\ntimeout_s = 5\n")
    assert ubertool("policy", "check", str(policy)).stdout == f"{policy}: ok\n"
    assert ubertool("policy", "check", "--policy", str(policy)).stdout == f"{policy}: ok\n"
    assert ubertool("policy", "check").returncode == 2


def test_run_a_failing_file_exits_1_with_its_traceback(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("print('start')\nraise RuntimeError('stopped here')\n")
    done = ubertool("run", str(script))
    assert done.returncode == 1
    assert done.stdout == "start\n"
    assert done.stderr.endswith('line 2, in <module>\n    raise RuntimeError(\'stopped here\')\n'
                                "RuntimeError: stopped here\n")


def test_run_from_stdin_with_a_kept_workspace(tmp_path: Path) -> None:
    done = ubertool("run", "--workspace", str(tmp_path / "ws"), "-",
                    stdin="open('/workspace/out.txt', 'w').write('made in the sandbox')\n")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ws" / "out.txt").read_text() == "made in the sandbox"


def test_run_timeout_exits_1_and_says_so() -> None:
    done = ubertool("run", "--timeout", "0.5", "-c", "import time\ntime.sleep(100)")
    assert done.returncode == 1
    assert "[timeout] the cell ran past its time limit of 0.5 s and was stopped" in done.stderr


def test_run_removes_its_own_workspace(_isolated_home: Path) -> None:
    assert ubertool("run", "-c", "open('/workspace/x', 'w').write('x')").returncode == 0
    (run,) = (_isolated_home / "runs").iterdir()
    assert [p.name for p in run.iterdir()] == ["audit.jsonl"]  # the workspace is gone, the trail stays


def test_run_needs_code_or_file() -> None:
    done = ubertool("run")
    assert done.returncode == 2
    assert "give exactly one of -c CODE or FILE" in done.stderr


def test_bad_policy_exits_2_before_running(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\ntimeout_s = 'soon'\n")
    done = ubertool("run", "--policy", str(policy), "-c", "print('never')")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"{policy}: limits.timeout_s: Input should be a valid number\n"
                           "No cell was run. Fix the policy; `ubertool policy check FILE` checks it.\n")


def test_policy_check(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[limits]\ntimeout_s = 5\n")
    bad.write_text("[limits]\ntimeout_s = 5\nturbo = true\n")
    assert ubertool("policy", "check", str(good)).stdout == f"{good}: ok\n"
    done = ubertool("policy", "check", str(bad))
    assert done.returncode == 2
    assert done.stderr == (f"{bad}: limits.turbo: unknown key (a typo, or a section this version "
                           "does not have)\n")


def test_policy_check_warns_when_credentialed_screenshots_are_allowed(tmp_path: Path) -> None:
    policy = tmp_path / "shots.toml"
    policy.write_text("[tools.browser]\norigins = ['https://app.example']\ncredentialed_screenshots = true\n"
                      "credentials = { 'https://app.example' = 'app' }\n"
                      "[credentials.app]\nsource = 'env'\nenv = 'APP_TOKEN'\n")
    done = ubertool("policy", "check", str(policy))
    assert (done.returncode, done.stdout) == (0, f"{policy}: ok\n")
    assert done.stderr == (f"{policy}: warning: tools.browser.credentialed_screenshots = true: "
                           "screenshots of pages on https://app.example:443 may show what the credential "
                           "opens, or the secret itself, and redaction cannot remove text from pixels\n")


def test_policy_show_prints_the_effective_policy_as_toml(tmp_path: Path) -> None:
    import tomllib

    (tmp_path / "data").mkdir()
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\ntimeout_s = 5\n[[grants]]\nhost = 'data'\nguest = '/data'\n")
    done = ubertool("policy", "show", "--policy", str(policy))
    assert done.returncode == 0
    assert done.stdout.startswith(f"# effective policy from {policy}\n")
    shown = tomllib.loads(done.stdout)
    assert shown["limits"]["timeout_s"] == 5.0 and shown["limits"]["max_timeout_s"] == 300.0
    assert shown["grants"] == [{"host": str((tmp_path / "data").resolve()), "guest": "/data",
                                "world_writable": False}]
    default = tomllib.loads(ubertool("policy", "show").stdout)
    assert default["grants"] == [] and default["workspace"]["guest_path"] == "/workspace"


def test_policy_grant_is_seen_by_the_guest(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "n.txt").write_text("7")
    policy = tmp_path / "p.toml"
    policy.write_text("[[grants]]\nhost = 'data'\nguest = '/data'\n")
    done = ubertool("run", "--policy", str(policy), "-c", "print(int(open('/data/n.txt').read()) * 6)")
    assert (done.returncode, done.stdout) == (0, "42\n")


def test_warm_reports_ready() -> None:
    done = ubertool("warm")
    assert done.returncode == 0
    assert done.stdout.startswith("The sandbox is ready (took ")


@pytest.mark.slow
def test_shell_keeps_state_interrupts_and_exits() -> None:
    child = pexpect.spawn(UBERTOOL, ["shell"], env=cli_env(), encoding="utf-8", timeout=60)
    try:
        child.expect("Ctrl-D exits.")
        child.expect(">>> ")
        child.sendline("x = 41")
        child.expect(">>> ")
        child.sendline("x + 1")
        child.expect("42")
        child.expect(">>> ")
        child.sendline("def double(n):")
        child.expect(r"\.\.\. ")
        child.sendline("    return 2 * n")
        child.expect(r"\.\.\. ")
        child.sendline("")
        child.expect(">>> ")
        child.sendline("double(x)")
        child.expect("82")
        child.expect(">>> ")
        child.sendline("import time; time.sleep(100)")  # only the hard stop ends it
        time.sleep(1.0)  # the cell is running now
        child.sendintr()
        # How many cells are replayed depends on the images the session kept (cells' timing).
        child.expect(r"\[cancelled\] the cell was interrupted; state restored: [0-4] earlier cells")
        child.expect(">>> ")
        child.sendline("x")
        child.expect("41")
        child.expect(">>> ")
        child.sendline("1/0")
        child.expect("ZeroDivisionError: division by zero")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
