"""Remote-resource mounts and scoped credentials, against a real HTTP server on 127.0.0.1,
through the real sandbox (a run opened from a real policy file)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import JournalBackend
from fakeapi import ApiState, serve_api

from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import Run, open_run
from ubertool.sandbox import Status

pytestmark = pytest.mark.anyio


@pytest.fixture
def api() -> Iterator[tuple[str, ApiState]]:
    with serve_api() as (url, state), serve_api("127.0.0.2") as (other, _):
        state.other_origin = other
        state.files.update({
            "/hello.txt": b"hello from the api",
            "/index.json": json.dumps(["hello.txt", "sales.csv", "users/"]).encode(),
            "/users/index.json": json.dumps([{"name": "42.json", "kind": "file"}]).encode(),
            "/users/42.json": b'{"id": 42, "name": "Ada"}',
            "/sales.csv": b"region,total\nEMEA,10\nAPAC,5\nEMEA,7\n",
        })
        yield url, state


@pytest.fixture
def policy_file(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "policy.toml"
        path.write_text(text)
        return path
    return write


def mount(url: str, extra: str = "") -> str:
    return (f"[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/remote/api'\nbase_url = '{url}/v1'\n"
            f"listing = {{ index = 'index.json' }}\ntimeout_s = 1.0\n{extra}\n")


@asynccontextmanager
async def run_with(path: Path) -> AsyncIterator[Run]:
    async with open_run(load_policy(path)) as run:
        yield run


async def value(run: Run, code: str) -> str:
    result = await run.cell(code)
    assert result.status is Status.OK, (result.error, result.notes, result.message)
    return str(result.value)


async def failure(run: Run, code: str) -> tuple[str, tuple[str, ...]]:
    result = await run.cell(code)
    assert result.status is Status.ERROR, result
    assert result.error is not None
    return result.error.type, result.notes


async def test_read_list_and_pandas(api: tuple[str, ApiState], policy_file: Callable[[str], Path]) -> None:
    url, _ = api
    async with run_with(policy_file(mount(url))) as run:
        assert await value(run, "open('/remote/api/hello.txt').read()") == "'hello from the api'"
        assert await value(run, "import os\nsorted(os.listdir('/remote/api'))") == \
            "['hello.txt', 'sales.csv', 'users']"
        assert await value(run, "os.listdir('/remote/api/users')") == "['42.json']"
        ada = await value(run, "import json\njson.load(open('/remote/api/users/42.json'))['name']")
        assert ada == "'Ada'"
        assert await value(run, "import pandas as pd\ndf = pd.read_csv('/remote/api/sales.csv')\n"
                                "df.groupby('region').total.sum().to_dict()") == "{'APAC': 5, 'EMEA': 17}"
        kind, _ = await failure(run, "open('/remote/api/missing.txt')")
        assert kind == "FileNotFoundError"


async def test_write_back_and_delete(api: tuple[str, ApiState], policy_file: Callable[[str], Path]) -> None:
    url, state = api
    extra = "writable = true\nmethods = ['GET', 'PUT', 'DELETE']"
    async with run_with(policy_file(mount(url, extra))) as run:
        await run.cell("with open('/remote/api/out.txt', 'w') as f:\n    f.write('part one, ')\n"
                       "    f.write('part two')")
        assert state.files["/out.txt"] == b"part one, part two"
        puts = [entry for entry in state.log if entry[0] == "PUT"]
        assert puts == [("PUT", "/v1/out.txt", None)]  # one request with the whole file, no empty PUT
        assert await value(run, "open('/remote/api/out.txt').read()") == "'part one, part two'"
        await run.cell("open('/remote/api/empty.txt', 'w').close()")
        assert state.files["/empty.txt"] == b""  # an empty file is sent at the end of its cell
        assert (await run.cell("import os\nos.remove('/remote/api/hello.txt')")).status is Status.OK
        assert "/hello.txt" not in state.files


async def test_method_not_allowed_is_refused(api: tuple[str, ApiState],
                                             policy_file: Callable[[str], Path]) -> None:
    url, state = api
    async with run_with(policy_file(mount(url, "writable = true\nmethods = ['GET', 'PUT']"))) as run:
        kind, notes = await failure(run, "import os\nos.remove('/remote/api/hello.txt')")
        assert kind == "PermissionError"
        assert notes == ("mount api: DELETE /hello.txt is not allowed (policy mounts.api.methods allows "
                         "GET, PUT)",)
        assert "/hello.txt" in state.files
        assert not [entry for entry in state.log if entry[0] == "DELETE"]
        assert await value(run, "1 + 1") == "2"  # the session is unharmed


TOKEN = "static-secret-token-9f8e7d"


def token_policy(url: str) -> str:
    return (mount(url, "credential = 'apitoken'")
            + "[credentials.apitoken]\nsource = 'env'\nenv = 'API_TOKEN'\n")


async def test_bearer_token_works_and_the_guest_never_sees_it(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path],
        monkeypatch: pytest.MonkeyPatch, _isolated_home: Path) -> None:
    url, state = api
    state.required_token = TOKEN
    monkeypatch.setenv("API_TOKEN", TOKEN)
    async with run_with(policy_file(token_policy(url))) as run:
        assert await value(run, "open('/remote/api/hello.txt').read()") == "'hello from the api'"
        assert ("GET", "/v1/hello.txt", f"Bearer {TOKEN}") in state.log
        # The server echoes the header back: the guest reads it redacted.
        echoed = await value(run, "open('/remote/api/echo-auth').read()")
        assert echoed == "'Bearer [redacted:apitoken]'"
        hunts = [
            "import os\nstr(dict(os.environ))",
            "import os\nfound = []\nfor d, _, fs in os.walk('/'):\n    for f in fs:\n"
            "        try:\n            found.append(open(os.path.join(d, f), 'rb').read())\n"
            "        except OSError:\n            pass\nstr(found)[:200000]",
            "import gc\nstr([o for o in gc.get_objects() if isinstance(o, (str, bytes))])",
            "open('/remote/api/nope/../../../etc/passwd').read()",
            "raise ValueError(open('/remote/api/echo-auth').read())",
        ]
        for code in hunts:
            result = await run.cell(code)
            seen = "".join([str(result.stdout), str(result.stderr), str(result.value),
                            result.error.traceback if result.error else ""])
            assert TOKEN not in seen, code
    audit = next(_isolated_home.glob("runs/*/audit.jsonl")).read_text()
    assert TOKEN not in audit
    requests = [json.loads(line) for line in audit.splitlines() if '"http_request"' in line]
    assert requests[0]["credential"] == "apitoken" and requests[0]["url"].endswith("/v1/hello.txt")


async def test_token_endpoint_mints_per_run_refreshes_and_revokes(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = api
    state.token_ttl_s = 2
    monkeypatch.setenv("CLIENT_SECRET", "s3cret-client")
    policy = policy_file(mount(url, "credential = 'idp'") + (
        "[credentials.idp]\nsource = 'client_credentials'\n"
        f"token_url = '{url}/token'\nrevoke_url = '{url}/revoke'\n"
        "client_id = 'ubertool'\nclient_secret_env = 'CLIENT_SECRET'\nscope = 'files:read'\n"))
    state.required_token = "never-valid-static"  # only minted tokens open the /v1 tree
    async with run_with(policy) as run:
        await value(run, "open('/remote/api/hello.txt').read()")
        await value(run, "open('/remote/api/users/42.json').read()")
        assert len(state.issued) == 1  # minted once, at first use
        assert state.token_requests[0]["scope"] == ["files:read"]
        assert state.token_requests[0]["grant_type"] == ["client_credentials"]
        time.sleep(2.1)
        await value(run, "open('/remote/api/sales.csv').read()")
        assert len(state.issued) == 2  # expired, so refreshed
        first_run = list(state.issued)
    async with run_with(policy) as run:
        await value(run, "open('/remote/api/hello.txt').read()")
        assert len(state.issued) == 3 and state.issued[2] not in first_run  # a new run, a new token
    assert state.revoked == [first_run[-1], state.issued[2]]  # each run's live token, at its end


async def test_token_exchange_asks_for_a_narrowed_token(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = api
    monkeypatch.setenv("USER_TOKEN", "user-subject-token-123")
    policy = policy_file(mount(url, "credential = 'delegated'") + (
        f"[credentials.delegated]\nsource = 'token_exchange'\ntoken_url = '{url}/token'\n"
        "subject_token_env = 'USER_TOKEN'\naudience = 'files-api'\nscope = 'files:read'\n"))
    async with run_with(policy) as run:
        await value(run, "open('/remote/api/hello.txt').read()")
    form = state.token_requests[0]
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:token-exchange"]
    assert form["subject_token"] == ["user-subject-token-123"]
    assert (form["audience"], form["scope"]) == (["files-api"], ["files:read"])


@pytest.mark.parametrize(("path", "extra", "kind", "note"), [
    ("redirect-out", "", "PermissionError",
     "mount api: redirect to another origin refused: http://127.0.0.2:"),
    ("big", "max_bytes = 1_000_000", "OSError", "mount api: /big: over the mount's max_bytes (1000000)"),
    ("bomb", "max_bytes = 1_000_000", "OSError", "mount api: /bomb: over the mount's max_bytes (1000000)"),
    ("slow", "", "TimeoutError", "mount api: GET /slow timed out after 1 s (mounts.api.timeout_s)"),
    ("fail", "", "OSError", "mount api: GET /fail answered HTTP 500"),
    ("truncated", "", "OSError", "mount api: GET /truncated failed: "),
    ("reset", "", "OSError", "mount api: GET /reset failed: "),
    ("garbage", "", "OSError", "mount api: GET /garbage failed: "),
])
async def test_refusals_and_backend_faults(api: tuple[str, ApiState], policy_file: Callable[[str], Path],
                                           path: str, extra: str, kind: str, note: str) -> None:
    url, state = api
    async with run_with(policy_file(mount(url, extra))) as run:
        got, notes = await failure(run, f"open('/remote/api/{path}', 'rb').read()")
        assert got == kind
        assert any(n.startswith(note) for n in notes), notes  # the guest's errno, and the reason
        assert await value(run, "open('/remote/api/hello.txt').read()") == "'hello from the api'"
    if path == "fail":
        assert state.hits["/v1/fail"] == 1  # a 500 is not one of the statuses worth retrying


async def test_same_origin_redirect_is_followed(api: tuple[str, ApiState],
                                               policy_file: Callable[[str], Path]) -> None:
    url, _ = api
    async with run_with(policy_file(mount(url))) as run:
        assert await value(run, "open('/remote/api/redirect-in').read()") == "'hello from the api'"


async def test_private_address_by_name_is_refused_unless_allowed(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path]) -> None:
    url, _ = api
    by_name = url.replace("127.0.0.1", "localhost")
    async with run_with(policy_file(mount(by_name))) as run:
        kind, notes = await failure(run, "open('/remote/api/hello.txt').read()")
        assert kind == "PermissionError"
        assert "localhost resolves to a private address" in notes[0]
        assert "set mounts.api.allow_private to allow it" in notes[0]
    async with run_with(policy_file(mount(by_name, "allow_private = true"))) as run:
        assert await value(run, "open('/remote/api/hello.txt').read()") == "'hello from the api'"


async def test_connection_refused(policy_file: Callable[[str], Path]) -> None:
    from servers import free_port

    async with run_with(policy_file(mount(f"http://127.0.0.1:{free_port()}"))) as run:
        kind, _ = await failure(run, "open('/remote/api/hello.txt').read()")
        assert kind == "OSError"


async def test_traversal_cannot_leave_the_mount(api: tuple[str, ApiState],
                                               policy_file: Callable[[str], Path]) -> None:
    url, state = api
    async with run_with(policy_file(mount(url))) as run:
        for code in ["open('/remote/api/../../etc/passwd').read()",
                     "open('/remote/api/users/../../api/../x').read()",
                     "open('/remote/api/%2e%2e/token').read()"]:
            result = await run.cell(code)
            assert result.status is Status.ERROR, code
        assert not any(path.startswith("/token") or not path.startswith("/v1/")
                       for _, path, _ in state.log), state.log


async def test_restore_replays_mount_reads_without_refetching(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path]) -> None:
    url, state = api
    extra = "writable = true\nmethods = ['GET', 'PUT']"
    async with run_with(policy_file(mount(url, extra))) as run:
        assert await value(run, "first = open('/remote/api/counter').read()\nfirst") == "'1'"
        await run.cell("open('/remote/api/report.txt', 'w').write('made once')")
        result = await run.cell("import time\ntime.sleep(100)", timeout_s=0.5)
        assert result.status is Status.TIMEOUT and result.restored is not None and result.restored.ok
        assert await value(run, "first") == "'1'"
        assert state.hits["/v1/counter"] == 1  # the replay answered from the recording
        assert [e for e in state.log if e[0] == "PUT"] == [("PUT", "/v1/report.txt", None)]
        assert await value(run, "open('/remote/api/counter').read()") == "'1'"  # cached for the run
        assert state.hits["/v1/counter"] == 1


async def test_audit_records_each_request(api: tuple[str, ApiState], policy_file: Callable[[str], Path],
                                          _isolated_home: Path) -> None:
    url, _ = api
    async with run_with(policy_file(mount(url))) as run:
        await run.cell("open('/remote/api/hello.txt').read()")
    lines = next(_isolated_home.glob("runs/*/audit.jsonl")).read_text().splitlines()
    event: dict[str, Any] = next(e for e in map(json.loads, lines) if e["event"] == "http_request")
    assert (event["mount"], event["method"], event["status"], event["bytes_in"]) == ("api", "GET", 200, 18)
    assert event["url"] == f"{url}/v1/hello.txt" and event["duration_s"] > 0


@pytest.mark.parametrize("path", ["redirect-up", "redirect-dots"])
async def test_a_redirect_cannot_leave_the_base_path(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch,
        path: str) -> None:
    url, state = api
    state.required_token = TOKEN
    monkeypatch.setenv("API_TOKEN", TOKEN)
    async with run_with(policy_file(token_policy(url))) as run:
        kind, notes = await failure(run, f"open('/remote/api/{path}').read()")
        assert kind == "PermissionError"
        assert notes[0].startswith("mount api: redirect out of the base URL's path /v1/ refused"), notes
    assert not any(not logged.startswith("/v1/") for _, logged, _ in state.log), state.log


async def test_a_token_echoed_into_a_refused_redirect_is_stored_redacted(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path],
        monkeypatch: pytest.MonkeyPatch, _isolated_home: Path, journal_backend: JournalBackend) -> None:
    from ubertool.runtime.journal import Journal, encode_exchanges

    url, state = api
    state.required_token = TOKEN
    monkeypatch.setenv("API_TOKEN", TOKEN)
    with Journal(journal_backend.store()) as journal:
        async with open_run(load_policy(policy_file(token_policy(url))), journal=journal) as run:
            kind, notes = await failure(run, "open('/remote/api/redirect-userinfo').read()")
            assert kind == "PermissionError" and TOKEN not in str(notes)
            cells = journal.cells(run.id)
    stored = "".join(encode_exchanges(cell.exchanges) for cell in cells)
    assert "redirect to another origin refused" in stored
    assert TOKEN not in stored
    assert TOKEN not in next(_isolated_home.glob("runs/*/audit.jsonl")).read_text()


@pytest.mark.parametrize(("address", "private"), [
    ("100.64.0.1", True), ("100.100.100.200", True), ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True),
    ("169.254.169.254", True), ("fe80::1", True), ("fc00::1", True), ("224.0.0.251", True),
    ("ff02::1", True), ("240.0.0.1", True), ("0.0.0.0", True), ("::", True), ("192.0.2.1", True),
    ("8.8.8.8", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False)])
def test_private_means_anything_not_globally_routable(address: str, private: bool) -> None:
    from ubertool.tools.mounts.http import is_private

    assert is_private(address) is private


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names under .test resolve to the addresses queued for them, one answer per lookup (the
    last answer repeats), as a rebinding DNS server answers."""
    import socket

    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def lookup(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            queued = answers[host]
            address = queued.pop(0) if len(queued) > 1 else queued[0]
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return answers


async def test_shared_and_mapped_addresses_are_refused_before_connecting(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path],
        resolver: dict[str, list[str]]) -> None:
    port = api[0].rsplit(":", 1)[1]
    for address in ("100.64.0.1", "::ffff:127.0.0.1"):
        resolver["metadata.test"] = [address]
        async with run_with(policy_file(mount(f"http://metadata.test:{port}"))) as run:
            kind, notes = await failure(run, "open('/remote/api/hello.txt').read()")
            assert kind == "PermissionError"
            assert f"metadata.test resolves to a private address {address}" in notes[0]


def test_the_address_checked_is_the_address_connected_to(
        api: tuple[str, ApiState], resolver: dict[str, list[str]]) -> None:
    import httpx

    from ubertool.tools.mounts.http import PinnedTransport

    url, state = api
    port = url.rsplit(":", 1)[1]
    checked: list[str] = []

    def check(host: str, address: str) -> None:
        checked.append(address)
        if address != "127.0.0.1":
            raise PermissionError(f"{address} refused")

    # First answer passes the check; every later lookup would point elsewhere (nothing listens
    # on 127.0.0.3). A second lookup between check and connect would reach the wrong address.
    resolver["rebind.test"] = ["127.0.0.1", "127.0.0.3"]
    with httpx.Client(transport=PinnedTransport(check), trust_env=False) as client:
        response = client.get(f"http://rebind.test:{port}/v1/hello.txt")
    assert response.status_code == 200 and response.content == b"hello from the api"
    assert checked == ["127.0.0.1"]
    assert ("GET", "/v1/hello.txt", None) in state.log


async def test_an_upstream_tools_structured_result_is_redacted(
        api: tuple[str, ApiState], policy_file: Callable[[str], Path], tmp_path: Path) -> None:
    import sys

    url, state = api
    state.required_token = TOKEN
    secret = tmp_path / "token.txt"
    secret.write_text(TOKEN)
    upstream = Path(__file__).with_name("upstream_server.py")
    policy = policy_file(mount(url, "credential = 'apitoken'")
                         + f"[credentials.apitoken]\nsource = 'file'\nfile = '{secret}'\n"
                         f"[tools.mcp.files]\ncommand = ['{sys.executable}', '{upstream}']\n"
                         "allow = ['read_text']\n")
    async with run_with(policy) as run:
        await value(run, "open('/remote/api/hello.txt').read()")  # the token is in use from here on
        # Reversed, it would pass the redaction of the cell's output: the guest must not get it at all.
        echoed = await value(run, "from ubertool import mcp\n"
                                  f"mcp.call('files', 'read_text', path='{secret}')['text'][::-1]")
        assert echoed == repr("[redacted:apitoken]"[::-1])


async def test_an_unauthorized_answer_says_so(api: tuple[str, ApiState],
                                              policy_file: Callable[[str], Path]) -> None:
    """The guest gets the errno its `errno` module knows; the cell's notes say what the server said."""
    url, state = api
    state.required_token = TOKEN  # and the mount sends none
    async with run_with(policy_file(mount(url))) as run:
        result = await run.cell("import errno\ntry:\n    open('/remote/api/hello.txt').read()\n"
                                "except PermissionError as e:\n    print(e.errno == errno.EACCES)")
    assert str(result.stdout) == "True\n"
    assert result.notes == ("mount api: GET /hello.txt answered HTTP 401 Unauthorized (check the mount's "
                            "credential)",)


async def test_writes_can_be_limited_to_part_of_a_mount(api: tuple[str, ApiState],
                                                        policy_file: Callable[[str], Path]) -> None:
    url, state = api
    policy = policy_file(mount(url, "writable = true\nmethods = ['GET', 'PUT', 'DELETE']\n"
                                    "write_paths = ['reports/*']"))
    async with run_with(policy) as run:
        ok = await run.cell("open('/remote/api/reports/q1/total.txt', 'w').write('17')")
        assert ok.status is Status.OK and state.files["/reports/q1/total.txt"] == b"17"
        kind, notes = await failure(run, "open('/remote/api/sales.csv', 'w').write('gone')")
        assert kind == "PermissionError"
        assert notes[0] == ("mount api: /sales.csv: not a place this mount may write (policy "
                            "mounts.api.write_paths allows reports/*)")
        kind, _ = await failure(run, "import os\nos.remove('/remote/api/hello.txt')")
        assert kind == "PermissionError"
    assert state.files["/sales.csv"].startswith(b"region") and "/hello.txt" in state.files
    assert not [entry for entry in state.log if entry[0] in ("PUT", "DELETE") and "reports" not in entry[1]]
