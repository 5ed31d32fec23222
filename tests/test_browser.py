"""The browser from sandbox code: real Chromium (Debian's) driven by Playwright, real pages on
loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from formapp import serve_form, url_of

from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run
from ubertool.sandbox import Status

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(shutil.which("chromium") is None,
                                                    reason="Debian's chromium is not installed")]
TOKEN = "browser-token-77c1d0"


async def test_fill_click_read_screenshot_and_blocking(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORM_TOKEN", TOKEN)
    with serve_form("127.0.0.2") as other, serve_form(token=TOKEN, other=url_of(other)) as app:
        url = url_of(app)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"[tools.browser]\norigins = ['{url}']\ncredentials = {{ '{url}' = 'form' }}\n"
                          "[credentials.form]\nsource = 'env'\nenv = 'FORM_TOKEN'\n")
        async with open_run(load_policy(policy)) as run:
            async def ok(code: str) -> str:
                result = await run.cell(code)
                assert result.status is Status.OK, (result.error, str(result.stderr))
                return str(result.value)

            assert await ok(f"from ubertool import browser\nbrowser.goto('{url}/')['title']") == "'Greeter'"
            await ok("browser.fill('#name', 'Ada')\nbrowser.click('#go')")
            assert await ok("browser.text('#result')") == "'Hello, Ada!'"
            # The host attached the token to the page's own request; the page never held it.
            signed = await ok("browser.wait_for('#secret:has-text(\"signed\")')\nbrowser.text('#secret')")
            assert signed == "'signed in'"
            assert ("/api/whoami", f"Bearer {TOKEN}") in app.seen
            shot = await ok("browser.screenshot('greeter.png')")
            assert shot == "'/workspace/greeter.png'"
            assert (run.workspace / "greeter.png").read_bytes().startswith(b"\x89PNG")
            assert await ok("open('/workspace/greeter.png', 'rb').read(4)") == "b'\\x89PNG'"

            refused = await run.cell(f"browser.goto('{url_of(other)}/')")
            assert refused.status is Status.ERROR and refused.error is not None
            assert refused.error.message == (f"navigation to {url_of(other)} is blocked: not in "
                                             f"tools.browser.origins ({url})")
            leaky = await run.cell(f"browser.goto('{url}/leaky')['title']")
            assert str(leaky.value) == "'Leaky'"
            assert f"ubertool.browser: blocked {url_of(other)}/pixel.png" in str(leaky.stderr)
            assert other.seen == []  # nothing reached the other origin
            denied = await run.cell("browser.evaluate('document.title')")
            assert denied.error is not None
            assert denied.error.message == ("running JavaScript is not allowed "
                                            "(policy tools.browser.evaluate = false)")
            everything = await run.cell("str(browser.text('body')) + browser.url")
            assert TOKEN not in str(everything.value)


async def test_no_browser_in_policy_is_a_clear_refusal(tmp_path: Path) -> None:
    from ubertool.runtime.policy import default_policy

    async with open_run(default_policy()) as run:
        result = await run.cell("from ubertool import browser\nbrowser.goto('http://127.0.0.1:1/')")
        assert result.error is not None
        assert result.error.message == ("no browser in the policy; an operator adds [tools.browser] "
                                        "with its origins")


async def test_a_browser_playbook_replays_live_and_offline(tmp_path: Path, _isolated_home: Path) -> None:
    import subprocess

    from conftest import cli_env, ubertool_command

    from ubertool.runtime.journal import Journal, default_journal_path

    env = cli_env()
    with serve_form() as app:
        url = url_of(app)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"[tools.browser]\norigins = ['{url}']\n")
        with Journal(default_journal_path()) as journal:
            async with open_run(load_policy(policy), journal=journal) as run:
                for code in [f"from ubertool import browser\npage = browser.goto('{url}/')",
                             "browser.fill('#name', 'Grace')\nbrowser.click('#go')\n"
                             "print(browser.text('#result'))",
                             "import ubertool\nubertool.save_playbook('greet')"]:
                    result = await run.cell(code)
                    assert result.status is Status.OK, result.error
        playbook = _isolated_home / "playbooks" / "greet.py"
        for extra in ([], ["--offline", "--check"]):
            done = subprocess.run([ubertool_command(), "replay", str(playbook), *extra], capture_output=True,
                                  text=True, timeout=120, env=env)
            assert (done.returncode, done.stdout) == (0, "Hello, Grace!\n"), done.stderr


async def test_a_screenshot_never_follows_a_link_out_of_the_workspace(tmp_path: Path) -> None:
    with serve_form() as app:
        url = url_of(app)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"[tools.browser]\norigins = ['{url}']\n")
        async with open_run(load_policy(policy)) as run:
            result = await run.cell(f"import os\nfrom ubertool import browser\nbrowser.goto('{url}/')\n"
                                    "os.symlink('../escape.png', '/workspace/shot.png')\n"
                                    "browser.screenshot('shot.png')")
            assert result.error is not None and result.error.type == "host.ToolError"
            assert result.error.message.startswith("screenshot 'shot.png' could not be written")
            assert not (run.workspace.parent / "escape.png").exists()
