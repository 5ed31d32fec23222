"""Per-run scoped credentials: secrets stay on the host and are attached only where allowed.

A `CredentialSpec` (policy `[credentials.NAME]`) says where a secret comes from: an environment
variable, a file, or a token endpoint (OAuth 2.0 client credentials, or RFC 8693 token
exchange) asked for a short-lived, narrowed token. A `CredentialBroker` serves one run: it
mints a token lazily at first use, caches it until it expires (or `max_ttl_s`), refreshes it,
and at the run's end forgets every token and revokes it where the endpoint allows (RFC 7009).
Every value it holds is registered with the run's `Redactor`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ubertool.tools.redact import Redactor
from ubertool.tools.tracing import span

if TYPE_CHECKING:
    import httpx

EventSink = Callable[..., None]
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
_REFRESH_EARLY_S = 5.0  # refresh a token this long before it expires (a tenth of a short one)


class CredentialSpec(BaseModel):
    """Where a secret comes from and where it may go. No secret value is ever in the policy:
    `env`, `file`, `client_secret_env` and `subject_token_env` name where to read it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    source: Literal["env", "file", "client_credentials", "token_exchange"]
    env: str | None = None
    file: Path | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    subject_token_env: str | None = None
    scope: str | None = None
    audience: str | None = None
    revoke_url: str | None = None
    header: str = "Authorization"
    scheme: str = "Bearer"
    max_ttl_s: float | None = Field(None, gt=0)
    methods: tuple[str, ...] | None = Field(None, strict=False)  # None: every method its mounts allow

    @model_validator(mode="before")
    @classmethod
    def _file_is_a_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("file"), str):
            data = {**data, "file": Path(data["file"])}
        return data

    @model_validator(mode="after")
    def _source_complete(self) -> CredentialSpec:
        needs = {"env": ("env",), "file": ("file",),
                 "client_credentials": ("token_url", "client_id", "client_secret_env"),
                 "token_exchange": ("token_url", "subject_token_env")}[self.source]
        missing = [key for key in needs if getattr(self, key) is None]
        if missing:
            raise ValueError(f"{missing[0]}: required when source = {self.source!r}")
        return self


class CredentialError(PermissionError):
    """A credential could not be had or may not be used here; the message is safe to show."""


@dataclass
class _Token:
    value: str
    refresh_at: float  # monotonic; inf for static secrets
    scope: str | None


class CredentialBroker:
    """One run's credentials. Use as a context manager: leaving it forgets and revokes tokens."""

    def __init__(self, specs: dict[str, CredentialSpec], redactor: Redactor, *,
                 on_event: EventSink | None = None, timeout_s: float = 10.0) -> None:
        self._specs = specs
        self._redactor = redactor
        self._on_event = on_event or (lambda *a, **k: None)
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._http: httpx.Client | None = None  # made at the first token endpoint request
        self._http_lock = threading.Lock()

    def __enter__(self) -> CredentialBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def header(self, name: str, *, method: str) -> tuple[str, str]:
        """The header to attach for credential `name` on a `method` request.

        Raises:
            CredentialError: unknown name, a method the credential does not serve, or the
                secret could not be read or minted (the message names the source, not a value).
        """
        spec = self._specs.get(name)
        if spec is None:
            raise CredentialError(f"no credential {name!r} in the policy")
        if spec.methods is not None and method not in spec.methods:
            raise CredentialError(f"credential {name!r} does not serve {method} "
                                  f"(policy credentials.{name}.methods)")
        with self._lock:
            token = self._tokens.get(name)
            if token is None or time.monotonic() >= token.refresh_at:
                if token is not None:
                    self._redactor.forget(token.value)
                with span("ubertool.credential.mint", credential=name, source=spec.source):
                    token = self._tokens[name] = self._obtain(name, spec)
                self._redactor.add(name, token.value)
        value = f"{spec.scheme} {token.value}" if spec.scheme else token.value
        return spec.header, value

    def scope(self, name: str) -> str | None:
        token = self._tokens.get(name)
        return token.scope if token else None

    def close(self) -> None:
        """Forget every token, revoking those whose credential names a `revoke_url`."""
        with self._lock:
            tokens, self._tokens = self._tokens, {}
        for name, token in tokens.items():
            spec = self._specs[name]
            if spec.revoke_url:
                import httpx

                try:
                    response = self._client().post(spec.revoke_url, data={
                        "token": token.value, "token_type_hint": "access_token",
                        **self._client_auth(spec)})
                    self._on_event("credential_revoked", credential=name, status=response.status_code)
                except httpx.HTTPError as exc:
                    self._on_event("credential_revoke_failed", credential=name, error=type(exc).__name__)
            self._redactor.forget(token.value)
        with self._http_lock:
            if self._http is not None:
                self._http.close()

    def _client(self) -> httpx.Client:
        """The client for token endpoints, made (and httpx imported) at the first request: a run
        whose credentials need none, or that has none, does not pay for either. Thread-safe."""
        import httpx

        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(timeout=self._timeout_s, follow_redirects=False)
            return self._http

    def _obtain(self, name: str, spec: CredentialSpec) -> _Token:
        if spec.source == "env":
            return _Token(_env(spec.env or "", name), float("inf"), None)
        if spec.source == "file":
            try:
                value = (spec.file or Path()).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CredentialError(f"credential {name!r}: cannot read its file: {exc.strerror}") from None
            return _Token(value, float("inf"), None)
        return self._mint(name, spec)

    def _client_auth(self, spec: CredentialSpec) -> dict[str, str]:
        if spec.client_id is None:
            return {}
        auth = {"client_id": spec.client_id}
        if spec.client_secret_env:
            auth["client_secret"] = _env(spec.client_secret_env, "client secret")
        return auth

    def _mint(self, name: str, spec: CredentialSpec) -> _Token:
        import httpx

        form: dict[str, str] = dict(self._client_auth(spec))
        if spec.source == "client_credentials":
            form["grant_type"] = "client_credentials"
        else:
            form.update(grant_type=TOKEN_EXCHANGE, subject_token_type=ACCESS_TOKEN_TYPE,
                        subject_token=_env(spec.subject_token_env or "", "subject token"))
        form.update({k: v for k, v in (("scope", spec.scope), ("audience", spec.audience)) if v})
        started = time.monotonic()
        try:
            response = self._client().post(spec.token_url or "", data=form)
            body = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as exc:
            raise CredentialError(f"credential {name!r}: the token endpoint failed "
                                  f"({type(exc).__name__})") from None
        if response.status_code != 200 or "access_token" not in body:
            raise CredentialError(f"credential {name!r}: the token endpoint answered "
                                  f"{response.status_code}")
        ttl = float(body.get("expires_in", 3600))
        if spec.max_ttl_s is not None:
            ttl = min(ttl, spec.max_ttl_s)
        scope = body.get("scope", spec.scope)
        self._on_event("credential_minted", credential=name, scope=scope, ttl_s=ttl,
                       duration_s=round(time.monotonic() - started, 6))
        return _Token(str(body["access_token"]), started + ttl - min(_REFRESH_EARLY_S, ttl / 10), scope)


def _env(variable: str, what: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise CredentialError(f"{what}: the environment variable {variable} is not set on the host")
    return value
