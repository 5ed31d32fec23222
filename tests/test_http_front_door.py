"""The HTTP front door through real clients against `ubertool serve --transport http` on
127.0.0.1: Host and Origin checks, bearer tokens and JWTs, sessions owned by their principal,
least-recently-used eviction, and a clean stop on SIGINT/SIGTERM with a cell in flight."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import cli_env, ubertool_command
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.server.auth.providers.jwt import RSAKeyPair
from joserfc.jwk import RSAKey
from mcp.types import TextContent
from servers import start_http_server

from ubertool.runtime.journal import Journal, default_journal_path

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.test"
AUDIENCE = "ubertool-test"
KID = "test-key"


def text(result: Any) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


def audit(home: Path, pattern: str = "runs/*/audit.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for log in sorted(home.glob(pattern)) for line in log.read_text().splitlines()]


async def call(client: Client, code: str, **args: Any) -> Any:
    return await client.call_tool("python", {"code": code, **args}, raise_on_error=False)


def post(url: str, **headers: str) -> httpx.Response:
    """A bare POST of an MCP-shaped body, as a web page or another program would send it."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    return httpx.post(url, json=body, timeout=30,
                      headers={"accept": "application/json, text/event-stream", **headers})


# ---- Host and Origin -------------------------------------------------------------------------

async def test_foreign_host_and_origin_are_refused_and_audited(serve_http: Callable[..., str],
                                                               _isolated_home: Path) -> None:
    url = serve_http("--allow-host", "mcp.test")
    port = url.split(":")[2].split("/")[0]
    rebound = post(url, host=f"rebind.example:{port}")
    assert rebound.status_code == 421
    foreign = post(url, origin=f"http://rebind.example:{port}")
    assert foreign.status_code == 403
    # Loopback is served, with or without a loopback Origin, and so is an allowed Host.
    for headers in ({}, {"Origin": f"http://127.0.0.1:{port}"}, {"Host": f"mcp.test:{port}"}):
        async with Client(StreamableHttpTransport(url, headers=headers), timeout=120) as client:
            assert (await call(client, "6 * 7")).structured_content["value"] == "42", headers
    events = audit(_isolated_home, "server/audit.jsonl")
    refused = {e["event"]: e for e in events if e["event"].endswith("_refused")}
    assert refused["host_refused"]["host"] == f"rebind.example:{port}"
    assert refused["host_refused"]["status"] == 421
    assert refused["origin_refused"]["origin"] == f"http://rebind.example:{port}"
    assert len([e for e in events if e["event"].endswith("_refused")]) == 2


def test_a_non_loopback_bind_needs_authentication() -> None:
    refused = subprocess.run([ubertool_command(), "serve", "--transport", "http", "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=120, env=cli_env())
    assert refused.returncode == 2
    assert "refusing to serve 0.0.0.0 without authentication" in refused.stderr
    assert "--insecure-no-auth" in refused.stderr


# ---- Authentication --------------------------------------------------------------------------

async def test_a_static_token_is_required(serve_http: Callable[..., str], _isolated_home: Path) -> None:
    secret = "s3cret-token-for-the-test-0123456789"
    token_file = _isolated_home / "token"
    token_file.write_text(secret + "\n")
    url = serve_http("--token-file", str(token_file))
    missing = post(url)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = post(url, authorization="Bearer " + secret[:-1] + "X")
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    async with Client(StreamableHttpTransport(url, auth=secret), timeout=120) as client:
        assert (await call(client, "1 + 1")).structured_content["value"] == "2"
    assert [e["principal"] for e in audit(_isolated_home) if e["event"] == "session_open"] == ["token"]
    server = audit(_isolated_home, "server/audit.jsonl")
    assert [e.get("bearer") for e in server if e["event"] == "auth_refused"] == [None, True]
    assert secret not in (_isolated_home / "server" / "audit.jsonl").read_text()


@contextmanager
def jwks_server(keys: RSAKeyPair) -> Iterator[str]:
    """A JSON Web Key Set for `keys` served on loopback; yields its URL."""
    jwk = {**RSAKey.import_key(keys.public_key).as_dict(private=False), "kid": KID, "alg": "RS256",
           "use": "sig"}
    body = json.dumps({"keys": [jwk]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def oauth(serve_http: Callable[..., str], tmp_path: Path) -> Iterator[tuple[str, Callable[..., str]]]:
    """A server that is an OAuth resource server for ISSUER/AUDIENCE; yields its URL and a
    function minting tokens (`mint(subject, audience=AUDIENCE)`)."""
    keys = RSAKeyPair.generate()
    with jwks_server(keys) as jwks:
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[limits]\nmax_sessions = 4\n\n[server.oauth]\nissuer = "{ISSUER}"\n'
                          f'audience = "{AUDIENCE}"\njwks_uri = "{jwks}"\n')
        url = serve_http("--policy", str(policy))

        def mint(subject: str, audience: str = AUDIENCE) -> str:
            return keys.create_token(subject=subject, issuer=ISSUER, audience=audience, kid=KID)

        yield url, mint


def as_principal(url: str, token: str) -> Client:
    return Client(StreamableHttpTransport(url, auth=token), timeout=120)


async def test_a_jwt_from_the_issuer_is_accepted_and_a_wrong_audience_refused(
        oauth: tuple[str, Callable[..., str]], _isolated_home: Path) -> None:
    url, mint = oauth
    async with as_principal(url, mint("alice")) as client:
        assert (await call(client, "2 + 3")).structured_content["value"] == "5"
    wrong = post(url, authorization="Bearer " + mint("alice", audience="another-service"))
    assert wrong.status_code == 401
    challenge = wrong.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge
    port = url.split(":")[2].split("/")[0]
    metadata_url = f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{metadata_url}"' in challenge
    metadata = httpx.get(metadata_url, timeout=30).json()  # RFC 9728
    assert metadata["resource"] == url and metadata["authorization_servers"] == [ISSUER + "/"]
    assert [e["principal"] for e in audit(_isolated_home) if e["event"] == "session_open"] == ["oauth:alice"]


async def test_a_session_and_its_playbooks_belong_to_their_principal(
        oauth: tuple[str, Callable[..., str]], _isolated_home: Path) -> None:
    url, mint = oauth
    async with as_principal(url, mint("alice")) as alice, as_principal(url, mint("mallory")) as mallory:
        first = await call(alice, "secret = 'alice only'")
        handle = first.structured_content["session"]
        stolen = await call(mallory, "secret", session=handle)
        assert stolen.is_error and text(stolen).startswith(f"no open session {handle!r}: it expired")
        assert (await call(alice, "secret", session=handle)).structured_content["value"] == "'alice only'"

        saved = await call(alice, "import ubertool\nubertool.save_playbook('mine', 'Alice only')",
                           session=handle)
        assert saved.structured_content["status"] == "ok", text(saved)
        playbook = (await alice.read_resource("playbook://mine"))[0].text
        assert handle not in playbook  # a playbook never carries a live handle
        assert json.loads((await alice.read_resource("playbook://index"))[0].text)["playbooks"] == ["mine"]
        assert json.loads((await mallory.read_resource("playbook://index"))[0].text)["playbooks"] == []
        with pytest.raises(Exception, match="no playbook named 'mine'"):
            await mallory.read_resource("playbook://mine")
        own = (await call(mallory, "x = 1")).structured_content["session"]
        overwrite = await call(mallory, "import ubertool\nubertool.save_playbook('mine')", session=own)
        assert overwrite.is_error and "exists already" in text(overwrite)
    refused = [e for e in audit(_isolated_home, "server/audit.jsonl") if e["event"] == "session_refused"]
    assert [e["principal"] for e in refused] == ["oauth:mallory"]


# ---- No lock-out -----------------------------------------------------------------------------

async def test_the_least_recently_used_idle_session_makes_room(serve_http: Callable[..., str],
                                                               tmp_path: Path, _isolated_home: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[limits]\nmax_sessions = 2\n")
    async with Client(serve_http("--policy", str(policy)), timeout=120) as c:
        one = (await call(c, "a = 1")).structured_content["session"]
        two = (await call(c, "b = 2")).structured_content["session"]
        await call(c, "b", session=two)  # `one` is now the least recently used
        three = await call(c, "c = 3")
        assert not three.is_error
        gone = await call(c, "a", session=one)
        assert gone.is_error and f"no open session {one!r}" in text(gone)
        assert (await call(c, "b", session=two)).structured_content["value"] == "2"
        closes = [e for e in audit(_isolated_home) if e["event"] == "session_close"]
        assert [e["session"] for e in closes] == [one]
        assert closes[0]["reason"].startswith(
            "evicted: the least recently used idle session of the principal holding the most (2 sessions")

        # With every session running a cell, a new one is refused, clearly.
        three_handle = three.structured_content["session"]
        results = []

        async def busy(handle: str) -> None:
            results.append(await call(c, "import time\ntime.sleep(4)", session=handle))

        async with anyio.create_task_group() as tg:
            tg.start_soon(busy, two)
            tg.start_soon(busy, three_handle)
            with anyio.fail_after(60):  # five cells ran before these two
                while len([e for e in audit(_isolated_home) if e["event"] == "cell_start"]) < 7:
                    await anyio.sleep(0.1)
            refused = await call(c, "1")
            assert refused.is_error
            assert text(refused).startswith("2 sessions are open, the policy's limits.max_sessions, "
                                             "and all of the server's are running a cell")
        assert [r.structured_content["status"] for r in results] == ["ok", "ok"]


async def test_a_full_server_takes_a_session_from_whoever_holds_the_most(
        oauth: tuple[str, Callable[..., str]], _isolated_home: Path) -> None:
    """Four sessions at most: bob's one, the oldest, stays when alice, holding three, opens a fifth."""
    url, mint = oauth
    async with as_principal(url, mint("bob")) as bob, as_principal(url, mint("alice")) as alice:
        bobs = (await call(bob, "b = 1")).structured_content["session"]
        alices = [(await call(alice, f"a = {n}")).structured_content["session"] for n in range(4)]
        assert (await call(bob, "b", session=bobs)).structured_content["value"] == "1"
        gone = await call(alice, "a", session=alices[0])
        assert gone.is_error and f"no open session {alices[0]!r}" in text(gone)
    closes = [e for e in audit(_isolated_home) if e["event"] == "session_close"]
    assert [e["session"] for e in closes] == [alices[0]]
    assert "of the principal holding the most (4 sessions are open" in closes[0]["reason"]


async def test_a_session_never_called_again_closes_soon(serve_http: Callable[..., str], tmp_path: Path,
                                                        _isolated_home: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[server]\nunused_session_idle_s = 1.0\n")
    async with Client(serve_http("--policy", str(policy)), timeout=120) as c:
        used = (await call(c, "x = 1")).structured_content["session"]
        await call(c, "x", session=used)
        once = (await call(c, "y = 1")).structured_content["session"]
        with anyio.fail_after(60):
            while not [e for e in audit(_isolated_home) if e["event"] == "session_close"]:
                await anyio.sleep(0.2)
        (closed,) = [e for e in audit(_isolated_home) if e["event"] == "session_close"]
        assert closed["session"] == once
        assert closed["reason"] == "never called again within server.unused_session_idle_s (1 s)"
        assert (await call(c, "x", session=used)).structured_content["value"] == "1"


# ---- Cancellation and shutdown ---------------------------------------------------------------

async def test_a_client_closing_its_stream_cancels_the_cell(serve_http: Callable[..., str],
                                                            _isolated_home: Path) -> None:
    started = anyio.Event()

    async def progress(value: float, total: float | None, message: str | None) -> None:
        started.set()

    async with Client(serve_http(), timeout=120, progress_handler=progress) as c:
        handle = (await call(c, "kept = 'yes'")).structured_content["session"]
        async with anyio.create_task_group() as tg:
            async def loop() -> None:
                await call(c, "while True: pass", session=handle, timeout_s=120)

            tg.start_soon(loop)
            with anyio.fail_after(60):
                await started.wait()
            tg.cancel_scope.cancel()  # the client closes that call's response stream
        with anyio.fail_after(60):  # the loop would hold the session for 120 s
            after = await call(c, "kept", session=handle)
        assert after.structured_content["value"] == "'yes'"
    abandoned = [e for e in audit(_isolated_home) if e["event"] == "cell_abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["reason"] == "CancelledError"


@pytest.fixture
async def server_process(_isolated_home: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], str, Any]]:
    with tempfile.TemporaryFile() as log:
        proc, url = start_http_server(ubertool_command(), cli_env(), stderr=log)
        try:
            yield proc, url, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_stops_the_server_cleanly_with_a_cell_in_flight(
        server_process: tuple[subprocess.Popen[bytes], str, Any], signum: int) -> None:
    proc, url, log = server_process
    started = anyio.Event()

    async def progress(value: float, total: float | None, message: str | None) -> None:
        started.set()

    async with Client(url, timeout=120, progress_handler=progress) as c, anyio.create_task_group() as tg:
        async def stop_when_running() -> None:
            with anyio.fail_after(60):
                await started.wait()
            proc.send_signal(signum)

        tg.start_soon(stop_when_running)
        with anyio.fail_after(60):
            answered = await call(c, "while True: pass", timeout_s=120)
    assert answered.is_error and answered.structured_content["status"] == "cancelled"
    assert "the server is stopping" in text(answered)
    assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=60)) == 0
    log.seek(0)
    stderr = log.read().decode(errors="replace")
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    assert "ASGI callable returned without completing response" not in stderr, stderr
    with Journal(default_journal_path()) as journal:
        (run,) = journal.runs()
    assert run.ended is not None
