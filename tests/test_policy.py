"""The policy file: the embedded default, a good file, and bad files with their exact messages."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ubertool.runtime.home import state_home
from ubertool.runtime.policy import PolicyError, default_policy, load_policy, policy_warnings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value.problems


def test_default_policy_grants_nothing_but_the_workspace() -> None:
    policy = default_policy()
    assert policy.grants == () and policy.mounts == ()
    assert policy.credentials == {}
    assert (policy.tools.programs, policy.tools.browser, policy.tools.mcp) == ({}, None, {})
    assert policy.workspace.guest_path == "/workspace"
    assert policy.limits.timeout_s == 30.0 and policy.limits.max_sessions == 16


def test_good_policy_resolves_grants_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write(tmp_path, '[limits]\ntimeout_s = 5\nmemory_mib = 512\n'
                           '[[grants]]\nhost = "data"\nguest = "/data"\n')
    policy = load_policy(path)
    assert policy.limits.timeout_s == 5.0 and policy.limits.memory_mib == 512
    assert policy.grants[0].host == (tmp_path / "data").resolve()
    assert policy.source == str(path)
    with pytest.raises(Exception, match="frozen"):
        policy.limits.timeout_s = 99  # type: ignore[misc]


BAD = [
    ("version = 2\n", "version: Input should be 1"),
    ("colour = 'red'\n", "colour: unknown key (a typo, or a section this version does not have)"),
    ("[limits]\ntimeout = 3\n",
     "limits.timeout: unknown key (a typo, or a section this version does not have)"),
    ("[limits]\ntimeout_s = '3'\n", "limits.timeout_s: Input should be a valid number"),
    ("[limits]\ntimeout_s = -1\n", "limits.timeout_s: Input should be greater than 0"),
    ("[limits]\ntimeout_s = 400.0\n", "limits.timeout_s: 400 is over max_timeout_s (300)"),
    ("[limits]\nmemory_mib = 8192\n", "limits.memory_mib: Input should be less than or equal to 4096"),
    ("[limits]\nmax_sessions = 0\n", "limits.max_sessions: Input should be greater than or equal to 1"),
    ("[workspace]\nkeep = 'yes'\n", "workspace.keep: Input should be a valid boolean"),
    ("[workspace]\nguest_path = 'ws'\n",
     "workspace.guest_path: must be an absolute, normalized guest path such as '/data', not 'ws'"),
    ("[workspace]\nguest_path = '/tmp/ws'\n",
     "workspace.guest_path: '/tmp/ws' overlaps '/tmp', which the sandbox uses itself"),
    ("[[grants]]\nguest = '/data'\n", "grants.0.host: required key is missing"),
    ("[[grants]]\nhost = 'missing-folder'\nguest = '/data'\n",
     "grants.0.host: '{tmp}/missing-folder' is not an existing folder"),
    ("[[grants]]\nhost = '.'\nguest = '/data/../etc'\n",
     "grants.0.guest: must be an absolute, normalized guest path such as '/data', not '/data/../etc'"),
    ("[[grants]]\nhost = '.'\nguest = '/workspace/in'\n",
     "grants.0.guest: '/workspace/in' overlaps '/workspace', which the sandbox uses itself"),
    ("[[grants]]\nhost = '.'\nguest = '/usr/local/lib/x'\n",
     "grants.0.guest: '/usr/local/lib/x' overlaps '/usr/local/lib', which the sandbox uses itself"),
    ("[[grants]]\nhost = '.'\nguest = '/a'\n[[grants]]\nhost = '.'\nguest = '/a/b'\n",
     "grants.1.guest: '/a/b' overlaps the grant at '/a'"),
    ("[[grants]]\nhost = '.'\nguest = '/a'\nwritable = true\n",
     "grants.0.writable: unknown key (a typo, or a section this version does not have)"),
    ("[[mounts]]\nkind = 'ftp'\nguest = '/remote'\n",
     "mounts.0: Input tag 'ftp' found using 'kind' does not match any of the expected tags: 'http', 'dir'"),
    ("[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\nbase_url = 'file:///etc'\n",
     "mounts.0.base_url: must be an http:// or https:// URL with a host, not 'file:///etc'"),
    ("[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\nbase_url = 'http://h'\nwritable = true\n",
     "mounts.0.methods: a writable mount needs its write_method 'PUT'"),
    ("[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\nbase_url = 'http://h'\ncredential = 'gh'\n",
     "mounts.0.credential: no [credentials.gh] in the policy"),
    ("[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\nbase_url = 'http://u:p@h'\n",
     "mounts.0.base_url: must not carry a query, a fragment or credentials; use [credentials]"),
    ("[[mounts]]\nkind = 'dir'\nname = 'out'\nhost = '.'\nguest = '/a'\n"
     "[[grants]]\nhost = '.'\nguest = '/a'\n",
     "mounts.0.guest: '/a' overlaps the grant at '/a'"),
    ("[credentials.github]\nsource = 'env'\n", "credentials.github.env: required when source = 'env'"),
    ("[credentials.github]\nsource = 'vault'\n",
     "credentials.github.source: Input should be 'env', 'file', 'client_credentials' or 'token_exchange'"),
    ("[credentials.idp]\nsource = 'client_credentials'\ntoken_url = 'http://idp/token'\n",
     "credentials.idp.client_id: required when source = 'client_credentials'"),
    ("[tools.programs.sh]\nargv = []\n", "tools.programs.sh.argv: Tuple should have at least 1 item after "
     "validation, not 0"),
    ("[tools.programs.sh]\nargv = ['sh']\nshell = true\n",
     "tools.programs.sh.shell: unknown key (a typo, or a section this version does not have)"),
    ("[tools.mcp.gh]\nallow = ['*']\n",
     "tools.mcp.gh.command: give exactly one of command (stdio) or url (HTTP)"),
    ("[tools.mcp.gh]\nurl = 'http://h/mcp'\n", "tools.mcp.gh.allow: required key is missing"),
    ("[tools.mcp.gh]\nurl = 'http://h/mcp'\nallow = ['*']\ncredential = 'gh'\n",
     "tools.mcp.gh.credential: no [credentials.gh] in the policy"),
    ("[tools.browser]\norigins = ['http://h/app']\n",
     "tools.browser.origins: 'http://h/app' is not an origin such as 'https://example.com'"),
    ("[tools.browser]\norigins = ['http://h']\ncredentials = { 'http://h' = 'gh' }\n",
     "tools.browser.credentials: http://h names no [credentials.gh]"),
    ("grants = 'x'\n", "grants: Input should be a valid tuple"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] + f"-{i}"
                                                        for i, (_, m) in enumerate(BAD)])
def test_bad_policy_names_file_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert problems(path) == [f"{path}: {message.format(tmp=tmp_path.resolve())}"]


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version = 1\n\n[limits\ntimeout_s = 3\n")
    assert problems(path) == [f"{path}:3: TOML syntax error: Expected ']' at the end of a table "
                              "declaration"]


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\ntimeout_s = 0\nmemory_mib = 1\nspeed = 3\n")
    assert problems(path) == [
        f"{path}: limits.timeout_s: Input should be greater than 0",
        f"{path}: limits.memory_mib: Input should be greater than or equal to 32",
        f"{path}: limits.speed: unknown key (a typo, or a section this version does not have)",
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems(path) == [f"{path}: cannot read the policy file: No such file or directory"]


def test_a_grant_may_not_show_ubertool_state(tmp_path: Path) -> None:
    home = state_home()
    home.mkdir(parents=True, exist_ok=True)
    path = write(tmp_path, f"[[grants]]\nhost = '{home.parent}'\nguest = '/up'\n")
    assert problems(path) == [f"{path}: grants.0.host: '{home.parent.resolve()}' would show the "
                              f"guest '{home.resolve()}', which holds ubertool's own state"]


def test_problems_across_sections_are_listed_with_the_rest(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write(tmp_path, "[limits]\nspeed = 3\n"
                           "[[grants]]\nhost = 'missing'\nguest = '/data'\n"
                           "[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/data/api'\n"
                           "base_url = 'https://example.com'\ncredential = 'nope'\n")
    assert problems(path) == [
        f"{path}: limits.speed: unknown key (a typo, or a section this version does not have)",
        f"{path}: mounts.0.guest: '/data/api' overlaps the grant at '/data'",
        f"{path}: mounts.0.credential: no [credentials.nope] in the policy",
    ]
    fixed = write(tmp_path, "[[grants]]\nhost = 'missing'\nguest = '/data'\n"
                            "[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\n"
                            "base_url = 'https://example.com'\ncredential = 'nope'\n")
    assert problems(fixed) == [f"{fixed}: mounts.0.credential: no [credentials.nope] in the policy",
                               f"{fixed}: grants.0.host: '{tmp_path / 'missing'}' is not an existing folder"]


def test_every_toml_block_of_the_readme_is_a_policy_that_checks(tmp_path: Path) -> None:
    """The README cannot drift from the parser: each block (with the README's [credentials]
    blocks when it names one) loads, with no warning about its mounts."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    credentials = "\n".join(b for b in blocks if b.lstrip().startswith("[credentials."))
    assert len(blocks) >= 6 and credentials
    shown = tomllib.loads(next(b for b in blocks if "[limits]" in b))  # "the embedded default ... "
    default = default_policy()
    assert {k: shown[k] for k in ("limits", "workspace", "journal")} == {
        k: getattr(default, k).model_dump(exclude_none=True) for k in ("limits", "workspace", "journal")}
    for index, block in enumerate(blocks):
        folder = tmp_path / f"block-{index}"
        folder.mkdir()
        for host in re.findall(r'^host\s*=\s*"([^"]+)"', block, re.M):
            (folder / host).mkdir(parents=True, exist_ok=True)
        text = block if "[credentials." in block or "credential" not in block else f"{block}\n{credentials}"
        path = folder / "policy.toml"
        path.write_text(text)
        policy = load_policy(path)
        assert [w for w in policy_warnings(policy) if w.startswith("mounts")] == [], block


def test_a_mount_method_its_credential_may_not_carry_is_warned_of(tmp_path: Path) -> None:
    path = write(tmp_path, "[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\n"
                           "base_url = 'https://example.com'\nwritable = true\nmethods = ['GET', 'PUT']\n"
                           "credential = 'tok'\n"
                           "[credentials.tok]\nsource = 'env'\nenv = 'T'\nmethods = ['GET']\n")
    assert policy_warnings(load_policy(path)) == [
        "mounts.0: PUT requests are refused, since credential 'tok' may only be attached to GET "
        "(credentials.tok.methods)"]
