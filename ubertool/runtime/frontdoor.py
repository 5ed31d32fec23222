"""The HTTP front door of `ubertool serve`: Host and Origin checks, authentication, principals.

- Host and Origin: fastmcp's guard in strict mode on every bind address. Allowed are the
  loopback names, the address a request arrived on, and what the operator adds (`--allow-host`,
  `--allow-origin`, `[server]`); a foreign Host gets 421, a foreign Origin 403. Each refusal,
  and each 401, is a line in the server's audit log, `$UBERTOOL_HOME/server/audit.jsonl`.
- Authentication: a static bearer token (from a file or an environment variable, compared in
  constant time), or an OAuth 2.1 resource server: fastmcp's JWT verifier (issuer, audience,
  JWKS or a public key) behind RFC 9728 protected-resource metadata.
- The principal of a request: `oauth:<sub>` for a JWT, `token` for the static token,
  `anonymous` when authentication is off.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from fastmcp.server.auth import AccessToken, AuthProvider, RemoteAuthProvider, TokenVerifier
from fastmcp.server.auth.providers.jwt import JWTVerifier
from fastmcp.server.dependencies import get_access_token
from fastmcp.server.http import HostOriginGuardMiddleware
from pydantic import AnyHttpUrl
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ubertool.runtime.audit import AuditLog
from ubertool.runtime.home import state_home
from ubertool.runtime.policy import Policy, ServerOAuth, ServerToken
from ubertool.runtime.runs import new_run_id
from ubertool.runtime.sessions import ANONYMOUS

TOKEN_PRINCIPAL = "token"
MIN_TOKEN_CHARS = 16
_PASSED = "ubertool.passed_guard"  # set in the ASGI scope once the guard let a request through


class FrontDoorError(ValueError):
    """The front door cannot be set up as asked; the message says what to change."""


def principal() -> str:
    """Who sent the current request: its token's principal, or `anonymous` without one."""
    token = get_access_token()
    if token is None:
        return ANONYMOUS
    if isinstance(token, _StaticAccess):
        return TOKEN_PRINCIPAL
    return f"oauth:{token.subject or token.client_id}"


class _StaticAccess(AccessToken):
    """An access granted by the static token (its own type, so no JWT claim can pose as it)."""


class StaticTokenVerifier(TokenVerifier):
    """One shared bearer token, compared in constant time; its principal is `token`."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(), self._secret):
            return None
        return _StaticAccess(token=token, client_id=TOKEN_PRINCIPAL, scopes=[])


def read_token(spec: ServerToken, base: Path | None) -> str:
    """The static token named by `spec` (a relative file is read from `base`).

    Raises:
        FrontDoorError: it is missing, unreadable or shorter than 16 characters.
    """
    if spec.env is not None:
        where, value = f"the environment variable {spec.env}", os.environ.get(spec.env, "")
    else:
        path = Path(spec.file or "").expanduser()
        path = path if path.is_absolute() or base is None else base / path
        where = f"the token file {path}"
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FrontDoorError(f"cannot read {where}: {exc.strerror or exc}") from None
    value = value.strip()
    if len(value) < MIN_TOKEN_CHARS:
        raise FrontDoorError(
            f"{where} holds no token of at least {MIN_TOKEN_CHARS} characters; make one with "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return value


def oauth_provider(spec: ServerOAuth, base: Path | None, base_url: str) -> AuthProvider:
    """fastmcp's JWT verifier for `spec`, serving RFC 9728 metadata for `base_url`/mcp.

    Raises:
        FrontDoorError: the public key file cannot be read or the algorithm is not supported.
    """
    key: str | None = None
    if spec.public_key_file is not None:
        path = Path(spec.public_key_file).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        try:
            key = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FrontDoorError(f"server.oauth.public_key_file: cannot read {path}: "
                                 f"{exc.strerror or exc}") from None
    try:
        verifier = JWTVerifier(public_key=key, jwks_uri=spec.jwks_uri, issuer=spec.issuer,
                               audience=spec.audience, algorithm=spec.algorithm,
                               required_scopes=list(spec.required_scopes) or None)
    except ValueError as exc:
        raise FrontDoorError(f"server.oauth: {exc}") from None
    servers = [AnyHttpUrl(url) for url in (spec.authorization_servers or (spec.issuer,))]
    return RemoteAuthProvider(verifier, servers, base_url=spec.base_url or base_url,
                              resource_name="ubertool")


@dataclass(frozen=True)
class FrontDoor:
    """What guards `serve --transport http`: the extra Host and Origin values, and the auth."""

    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    auth: AuthProvider | None = field(default=None, compare=False)

    @classmethod
    def of(cls, policy: Policy, *, host: str, port: int, allow_hosts: tuple[str, ...] = (),
           allow_origins: tuple[str, ...] = (), token: ServerToken | None = None,
           insecure_no_auth: bool = False) -> FrontDoor:
        """The front door from the policy's `[server]` and the command line (`token` replaces
        the policy's `[server.token]`).

        Raises:
            FrontDoorError: the auth cannot be set up, or `host` is not a loopback address and
                there is no auth and no `insecure_no_auth`.
        """
        server = policy.server
        base = policy.path.parent if policy.path is not None else None
        token = token or server.token
        auth: AuthProvider | None = None
        if token is not None:
            auth = StaticTokenVerifier(read_token(token, base))
        elif server.oauth is not None:
            auth = oauth_provider(server.oauth, base, f"http://{_url_host(host)}:{port}")
        if auth is None and not is_loopback(host) and not insecure_no_auth:
            raise FrontDoorError(
                f"refusing to serve {host} without authentication: anyone who reaches it could run "
                "code with everything the policy grants. Give --token-file/--token-env or a "
                "[server.token] or [server.oauth] policy section, bind to 127.0.0.1, or pass "
                "--insecure-no-auth if something in front of ubertool authenticates.")
        return cls((*server.allowed_hosts, *allow_hosts), (*server.allowed_origins, *allow_origins), auth)

    def guard(self, app: ASGIApp, audit: AuditLog) -> ASGIApp:
        """`app` behind the Host/Origin guard, refusals audited."""
        return AuditedGuard(app, audit, allowed_hosts=self.allowed_hosts,
                            allowed_origins=self.allowed_origins)

    @property
    def kind(self) -> str:
        if self.auth is None:
            return "none"
        return "token" if isinstance(self.auth, StaticTokenVerifier) else "oauth"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class AuditedGuard(HostOriginGuardMiddleware):
    """fastmcp's Host/Origin guard in strict mode (every request, every bind address); a
    request it refuses (421 Host, 403 Origin), and a 401 behind it, is audited."""

    def __init__(self, app: ASGIApp, audit: AuditLog, *, allowed_hosts: tuple[str, ...],
                 allowed_origins: tuple[str, ...]) -> None:
        async def passed(scope: Scope, receive: Receive, send: Send) -> None:
            scope[_PASSED] = True
            await app(scope, receive, send)

        super().__init__(passed, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
                         mode="strict")
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        async def audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._audit(scope, message["status"])
            await send(message)

        await super().__call__(scope, receive, audited)

    def _audit(self, scope: Scope, status: int) -> None:
        if scope.get(_PASSED):
            if status != 401:
                return
            event = "auth_refused"
        else:
            event = "origin_refused" if status == 403 else "host_refused"
        headers = Headers(scope=scope)
        client = scope.get("client")
        self.audit.event(event, status=status, method=scope.get("method"), path=scope.get("path"),
                         host=_clip(headers.get("host")), origin=_clip(headers.get("origin")),
                         client=f"{client[0]}:{client[1]}" if client else None,
                         bearer="bearer " in headers.get("authorization", "").lower() or None)


def _clip(value: str | None) -> str | None:
    """A header as sent (hostile input), cut to a length an audit line can hold."""
    return None if value is None else value[:200]


@contextmanager
def server_audit(**facts: Any) -> Iterator[AuditLog]:
    """The server's own audit log, `$UBERTOOL_HOME/server/audit.jsonl` (appended; each line's
    `run` is `server-<id>` of this process), with `server_start` and `server_stop` around."""
    with AuditLog(state_home() / "server" / "audit.jsonl", f"server-{new_run_id()}") as audit:
        audit.event("server_start", **facts)
        try:
            yield audit
        finally:
            audit.event("server_stop")
