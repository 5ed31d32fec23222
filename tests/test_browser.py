"""The browser from sandbox code: real Chromium (Debian's) driven by Playwright, real pages on
loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from formapp import serve_form, url_of

from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import Run, open_run
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
            shot = await run.cell("browser.screenshot('greeter.png')")
            assert shot.error is not None and shot.error.message == (
                f"a screenshot of a page on {url} is refused: that origin has a credential (an operator "
                "allows it with tools.browser.credentialed_screenshots = true)")
            assert not (run.workspace / "greeter.png").exists()

            refused = await run.cell(f"browser.goto('{url_of(other)}/')")
            assert refused.status is Status.ERROR and refused.error is not None
            assert refused.error.message == (f"navigation to {url_of(other)} is blocked: not in "
                                             f"tools.browser.origins ({url})")
            leaky = await run.cell(f"browser.goto('{url}/leaky')['title']")
            assert str(leaky.value) == "'Leaky'", leaky.error
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
            # The link is replaced by the screenshot, never written through.
            assert result.status is Status.OK, result
            shot = run.workspace / "shot.png"
            assert not shot.is_symlink() and shot.read_bytes().startswith(b"\x89PNG")
            assert not (run.workspace.parent / "escape.png").exists()


@asynccontextmanager
async def browser_run(tmp_path: Path, origins: list[str], credential_origin: str = "",
                      extra: str = "") -> AsyncIterator[Run]:
    """A run whose browser allows `origins`, with the 'form' credential (env FORM_TOKEN) on
    `credential_origin` when given."""
    text = f"[tools.browser]\norigins = {json.dumps(origins)}\n{extra}\n"
    if credential_origin:
        text += (f"credentials = {{ '{credential_origin}' = 'form' }}\n"
                 "[credentials.form]\nsource = 'env'\nenv = 'FORM_TOKEN'\n")
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    async with open_run(load_policy(policy)) as run:
        yield run


async def value_of(run: Run, code: str) -> str:
    result = await run.cell(code)
    assert result.status is Status.OK, (result.error, str(result.stderr))
    return str(result.value)


def audit_events(home: Path, kind: str) -> list[dict[str, object]]:
    lines = next(home.glob("runs/*/audit.jsonl")).read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == kind]


async def test_every_redirect_hop_is_checked_and_the_credential_never_follows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_home: Path) -> None:
    monkeypatch.setenv("FORM_TOKEN", TOKEN)
    with serve_form("127.0.0.2") as other, serve_form("127.0.0.3") as plain, \
            serve_form(token=TOKEN, other=url_of(other)) as app:
        url, elsewhere = url_of(app), url_of(other)
        async with browser_run(tmp_path, [url, url_of(plain)], url) as run:
            # A navigation the host sends with the credential: its redirect out is refused.
            hop = await run.cell(f"from ubertool import browser\n"
                                 f"browser.goto('{url}/redirect?to={elsewhere}/steal')")
            assert hop.error is not None
            assert (f"refused by tools.browser.origins: {elsewhere}/steal (redirect from {url}/redirect)"
                    in hop.error.message)
            # A credentialed page's image, redirected out.
            leaky = await run.cell(f"browser.goto('{url}/leaky-redirect')['title']")
            assert str(leaky.value) == "'Leaky'", leaky.error
            assert f"ubertool.browser: blocked {elsewhere}/pixel.png (redirect from {url}/redirect)" \
                in str(leaky.stderr)
            # A redirect between allowed origins is followed; the credential stays on its origin.
            assert await value_of(run, f"browser.goto('{url_of(plain)}/redirect?to={url}/echo')['url']") \
                == f"'{url}/echo'"
            # A page with no credential: the browser follows its redirect, into the refusing proxy.
            plain_hop = await run.cell(f"browser.goto('{url_of(plain)}/redirect?to={elsewhere}/steal2')")
            assert plain_hop.error is not None
            assert f"{elsewhere}/steal2 (outside request routing" in plain_hop.error.message
        assert other.seen == []  # no hop reached the other origin
        assert ("/echo", None) in app.seen  # reached by a redirect from the plain origin: no token
    refusals = audit_events(_isolated_home, "browser_blocked")
    assert {(e["url"], e["via"]) for e in refusals} >= {
        (f"{elsewhere}/steal", f"redirect from {url}/redirect"),
        (f"{elsewhere}/steal2", "outside request routing: a Worker's WebSocket or a redirect's next hop")}


async def test_websockets_from_pages_and_workers_reach_only_allowed_origins(
        tmp_path: Path, _isolated_home: Path) -> None:
    with serve_form("127.0.0.2") as other, serve_form() as app:
        url, socket = url_of(app), "ws://" + url_of(other).removeprefix("http://") + "/ws"
        async with browser_run(tmp_path, [url]) as run:
            loaded = await run.cell("from ubertool import browser\n"
                                    f"browser.goto('{url}/sockets?to={socket}')")
            result = await run.cell("browser.wait_for('#page:has-text(\"closed\")')\n"
                                    "browser.wait_for('#worker:has-text(\"closed\")')")
            assert loaded.status is Status.OK and result.status is Status.OK, (loaded.error, result.error)
            stderr = str(loaded.stderr) + str(result.stderr)  # told with whichever answer came next
            assert f"ubertool.browser: blocked {socket} (WebSocket)" in stderr
            assert f"ubertool.browser: blocked {url_of(other).removeprefix('http://')} (outside request " \
                "routing" in stderr
        assert other.seen == []
    assert {e["via"] for e in audit_events(_isolated_home, "browser_blocked")} >= {
        "WebSocket", "outside request routing: a Worker's WebSocket or a redirect's next hop"}


async def test_a_credential_goes_only_to_requests_its_own_origin_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORM_TOKEN", TOKEN)
    with serve_form("127.0.0.3") as plain, serve_form(token=TOKEN) as app:
        url = url_of(app)
        async with browser_run(tmp_path, [url_of(plain), url], url) as run:
            # A page on another allowed origin reads the credentialed API (it answers CORS *).
            await value_of(run, f"from ubertool import browser\nbrowser.goto('{url_of(plain)}/cross?to={url}"
                                "/api/whoami')")
            assert await value_of(run, "browser.wait_for('#out:not(:empty)')\nbrowser.text('#out')") == \
                "'anonymous'"
            assert ("/api/whoami", None) in app.seen and ("/api/whoami", f"Bearer {TOKEN}") not in app.seen
            # The host's own navigation and the page's same-origin requests carry it.
            await value_of(run, f"browser.goto('{url}/')")
            assert await value_of(run, "browser.wait_for('#secret:has-text(\"signed\")')\n"
                                       "browser.text('#secret')") == "'signed in'"


async def test_credentialed_screenshots_are_an_explicit_choice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORM_TOKEN", TOKEN)
    with serve_form(token=TOKEN) as app:
        url = url_of(app)
        async with browser_run(tmp_path, [url], url, "credentialed_screenshots = true") as run:
            shot = await value_of(run, f"from ubertool import browser\nbrowser.goto('{url}/')\n"
                                       "browser.screenshot('greeter.png')")
            assert shot == "'/workspace/greeter.png'"
            assert (run.workspace / "greeter.png").read_bytes().startswith(b"\x89PNG")
            assert await value_of(run, "open('/workspace/greeter.png', 'rb').read(4)") == "b'\\x89PNG'"


ODD_TOKEN = 'b/r+o"w\\s=e&r?t:k-9f3a'  # every encoding of it differs from it


async def test_what_a_page_echoes_is_redacted_in_every_encoding_and_everywhere_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_home: Path) -> None:
    import base64
    from urllib.parse import quote

    from ubertool.runtime.journal import Journal, default_journal_path, encode_exchanges

    monkeypatch.setenv("FORM_TOKEN", ODD_TOKEN)
    with serve_form() as app, Journal(default_journal_path()) as journal:
        url = url_of(app)
        policy = tmp_path / "policy.toml"
        policy.write_text(f"[tools.browser]\norigins = ['{url}']\nevaluate = true\n"
                          f"credentials = {{ '{url}' = 'form' }}\n"
                          "[credentials.form]\nsource = 'env'\nenv = 'FORM_TOKEN'\n")
        async with open_run(load_policy(policy), journal=journal) as run:
            assert await value_of(run, f"from ubertool import browser\nbrowser.goto('{url}/echo')['title']") \
                == "'Bearer [redacted:form]'"
            assert await value_of(run, "browser.title") == "'Bearer [redacted:form]'"
            assert await value_of(run, "browser.evaluate('[document.title]')") == "['Bearer [redacted:form]']"
            texts = await value_of(run, "[browser.text('#' + k) for k in ('b64', 'url', 'json', 'hex')]")
            assert "form]" in texts and texts.count("[redacted:form]") == 4, texts
            record = run.record
        stored = "".join(encode_exchanges(cell.exchanges) + cell.stdout + (cell.value or "")
                         for cell in journal.cells(record.id))
        stored += next(_isolated_home.glob("runs/*/audit.jsonl")).read_text()
    raw = ODD_TOKEN.encode()
    for form in (ODD_TOKEN, quote(ODD_TOKEN, safe=""), json.dumps(ODD_TOKEN)[1:-1], raw.hex(),
                 base64.b64encode(raw).decode()[:-4]):
        assert form not in stored and form not in texts, form
