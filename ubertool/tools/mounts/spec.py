"""What the policy says of an `http` mount (`[[mounts]]` with `kind = "http"`), validated.

Kept apart from the mount itself (`ubertool.tools.mounts.http`), so that reading a policy does
not import the HTTP client: that is imported only when a run opens an http mount.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Listing(BaseModel):
    """How folders are listed: a JSON index file in each folder, or the policy's own paths."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    index: str | None = None
    paths: tuple[str, ...] | None = Field(None, strict=False)

    @model_validator(mode="after")
    def _one(self) -> Listing:
        if (self.index is None) == (self.paths is None):
            raise ValueError("index: give exactly one of listing.index or listing.paths")
        return self


class HttpMountSpec(BaseModel):
    """Policy `[[mounts]]` with `kind = "http"`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    kind: Literal["http"]
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    guest: str
    base_url: str
    writable: bool = False
    methods: tuple[Literal["GET", "HEAD", "PUT", "POST", "DELETE"], ...] = Field(("GET",), strict=False)
    write_method: Literal["PUT", "POST"] = "PUT"
    listing: Listing | None = None
    credential: str | None = None
    timeout_s: float = Field(10.0, gt=0, le=600)
    max_bytes: int = Field(10 * 2**20, ge=1, le=2**31)
    retries: int = Field(2, ge=0, le=10)
    allow_private: bool = False
    # Where a writable mount may be written (files sent, removed), as globs on the path within
    # the mount ("reports/*"; `*` also matches '/'); None: anywhere.
    write_paths: tuple[str, ...] | None = Field(None, strict=False)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, not {value!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, a fragment or credentials; use [credentials]")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _writes_allowed(self) -> HttpMountSpec:
        if "GET" not in self.methods:
            raise ValueError("methods: must include GET (reading is how a mount is used)")
        if self.writable and self.write_method not in self.methods:
            raise ValueError(f"methods: a writable mount needs its write_method {self.write_method!r}")
        return self
