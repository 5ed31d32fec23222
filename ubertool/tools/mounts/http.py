"""An `http` mount: a remote resource tree the host fetches and writes back for the guest.

Reading `<guest>/users/42.json` GETs `<base_url>/users/42.json`. A folder is listed from a JSON
index (`listing.index`, fetched inside that folder) or from paths named in the policy
(`listing.paths`). A file the guest writes is sent with `write_method` when it is closed (an
empty file at the end of the cell); removing a file sends DELETE. Only the policy's methods go
out, only to the mount's own origin and under its base URL's path: redirects elsewhere are
refused. So are addresses that are not globally routable (loopback, private, shared, link-local,
multicast, reserved; IPv4-mapped IPv6 as its IPv4) unless the base URL names an address itself
or `allow_private` is set; a host name is resolved once per connection and the address checked
is the address connected to.
Bodies are capped (after decompression), requests time out, idempotent ones are retried.
Every request is recorded (`Recorder`), audited, and stripped of the run's secrets.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import ipaddress
import json
import posixpath
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpcore
import httpx

from ubertool.tools.credentials import CredentialBroker, CredentialError
from ubertool.tools.mounts import Entry
from ubertool.tools.mounts.spec import HttpMountSpec
from ubertool.tools.recorder import Body, Json, Recorder, ReplayMismatch, Spool
from ubertool.tools.redact import Redactor
from ubertool.tools.tracing import failed, span

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
_RETRY_STATUS = frozenset({502, 503, 504})
_MAX_REDIRECTS = 5
_REASONS = {401: "Unauthorized (check the mount's credential)", 403: "Forbidden", 405: "Method Not Allowed"}


class _Refused(PermissionError):
    pass


def is_private(address: str) -> bool:
    """Is `address` anything but a globally routable unicast address? An IPv4-mapped IPv6
    address is judged as its IPv4 address (`::ffff:127.0.0.1` is loopback)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


AddressCheck = Callable[[str, str], None]  # (host, address): raises to refuse connecting


class PinnedBackend(httpcore.NetworkBackend):
    """httpcore's network backend that resolves a host once per connection, checks every
    address it resolves to, and connects to one of those very addresses (no second lookup, so
    no DNS-rebinding window). The Host header and TLS server name stay the URL's host name:
    httpcore sets them from the URL, not from the address connected to."""

    def __init__(self, check: AddressCheck) -> None:
        self._check = check
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise _Refused(errno.EPERM, f"cannot resolve {host}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            self._check(host, address)
        failure: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport (its pooling and error mapping) over a `PinnedBackend`."""

    def __init__(self, check: AddressCheck) -> None:
        super().__init__()
        # httpx builds its httpcore pool with no way to pass a network backend; this is the one
        # attribute it sends every request through (tests/test_mounts.py pins the behaviour).
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(),
                                             network_backend=PinnedBackend(check))


class HttpMount:
    """The provider for one `http` mount in one run. Safe to call from the turn's thread."""

    def __init__(self, spec: HttpMountSpec, *, credentials: CredentialBroker | None,
                 recorder: Recorder, redactor: Redactor, spool: Spool,
                 on_event: Callable[..., None] | None = None) -> None:
        self.spec = spec
        self._credentials = credentials
        self._recorder = recorder
        self._redactor = redactor
        self._on_event = on_event or (lambda *a, **k: None)
        self._origin = urlsplit(spec.base_url)
        self._spool = spool
        self._pending: set[str] = set()  # files created empty, their content not written yet
        self._notes: list[str] = []
        self._lock = threading.Lock()
        base_path = self._origin.path.rstrip("/")
        self._prefix = base_path + "/"  # every request's path starts so (redirects included)
        self._http = httpx.Client(timeout=spec.timeout_s, follow_redirects=False, trust_env=False,
                                  transport=PinnedTransport(self._check_address))

    def close(self) -> None:
        self._http.close()

    # -- the provider protocol -------------------------------------------------------------

    def stat(self, path: str) -> Entry:
        if path == "/" or self._is_listed_dir(path):
            return Entry("dir")
        if path in self._pending:
            return Entry("file", 0)
        listed = self._listed_kind(path)
        if listed == "dir":
            return Entry("dir")
        # The size of the answer the read will take from the run's cache: no copy of the body.
        return Entry("file", _size(self._body("GET", path)))

    def list(self, path: str) -> list[tuple[str, str]]:
        listing = self.spec.listing
        if listing is None:
            raise self._refuse(f"{path}: this mount has no listing (policy mounts.{self.spec.name}.listing)")
        if listing.paths is not None:
            return self._children_from_paths(path, listing.paths)
        index = posixpath.join(path, listing.index or "")
        try:
            entries = json.loads(self.read(index))
        except ValueError:
            raise OSError(errno.EIO, f"{index}: the listing is not JSON") from None
        return [self._entry(item) for item in entries] if isinstance(entries, list) else []

    def read(self, path: str) -> bytes:
        if path in self._pending:
            return b""
        return self._call("GET", path)

    def _may_write(self, path: str) -> None:
        patterns = self.spec.write_paths
        if patterns is not None and not any(fnmatch.fnmatchcase(path.lstrip("/"), p) for p in patterns):
            raise self._refuse(f"{path}: not a place this mount may write (policy mounts.{self.spec.name}"
                               f".write_paths allows {', '.join(patterns) or 'nothing'})")

    def write(self, path: str, data: bytes) -> None:
        self._may_write(path)
        if not data:  # the create at open(); the content comes at close()
            self._pending.add(path)
            return
        self._pending.discard(path)
        self._call(self.spec.write_method, path, data)

    def remove(self, path: str) -> None:
        self._may_write(path)
        self._pending.discard(path)
        self._call("DELETE", path)

    def mkdir(self, path: str) -> None:
        raise self._refuse(f"{path}: an http mount has no folders to make")

    def rmdir(self, path: str) -> None:
        raise self._refuse(f"{path}: an http mount has no folders to remove")

    def rename(self, src: str, dst: str) -> None:
        raise self._refuse(f"{src}: an http mount cannot rename")

    def flush(self) -> None:
        """Send the files created empty and never written (called at the end of each cell)."""
        pending, self._pending = self._pending, set()
        for path in sorted(pending):
            self._call(self.spec.write_method, path, b"")

    def take_notes(self) -> list[str]:
        """Why requests were refused since the last call (the guest only sees an errno)."""
        with self._lock:
            notes, self._notes = self._notes, []
        return notes

    # -- listing ---------------------------------------------------------------------------

    def _entry(self, item: Any) -> tuple[str, str]:
        if isinstance(item, dict):
            return str(item.get("name", "")).strip("/"), "dir" if item.get("kind") == "dir" else "file"
        name = str(item)
        return name.strip("/"), "dir" if name.endswith("/") else "file"

    def _children_from_paths(self, path: str, paths: tuple[str, ...]) -> list[tuple[str, str]]:
        prefix = path.rstrip("/") + "/"
        children: dict[str, str] = {}
        for listed in paths:
            full = "/" + listed.strip("/")
            if full.startswith(prefix):
                head, _, rest = full[len(prefix):].partition("/")
                children[head] = "dir" if rest else children.get(head, "file")
        if not children and path != "/":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return sorted(children.items())

    def _is_listed_dir(self, path: str) -> bool:
        paths = self.spec.listing.paths if self.spec.listing else None
        prefix = path.rstrip("/") + "/"
        return bool(paths) and any(("/" + p.strip("/")).startswith(prefix) for p in paths or ())

    def _listed_kind(self, path: str) -> str | None:
        if self.spec.listing is None or self.spec.listing.index is None:
            return None
        parent, name = posixpath.split(path)
        try:
            return dict(self.list(parent)).get(name)
        except OSError:
            return None

    # -- requests ----------------------------------------------------------------------------

    def _refuse(self, note: str) -> PermissionError:
        with self._lock:
            self._notes.append(f"mount {self.spec.name}: {note}")
        return _Refused(errno.EPERM, note)

    def _url(self, path: str) -> str:
        segments = [s for s in path.split("/") if s]
        if any(s in (".", "..") for s in segments):
            raise self._refuse(f"{path}: '.' and '..' are not allowed in mount paths")
        return self.spec.base_url + "/" + "/".join(quote(s, safe="") for s in segments)

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        answer = self._body(method, path, body)
        return answer.read() if isinstance(answer, Body) else bytes(answer)

    def _body(self, method: str, path: str, body: bytes | None = None) -> Body | bytes:
        """The answer's body (kept in the run's spool, or bytes from a recording), or the
        guest's error (see `_answer`)."""
        if method not in self.spec.methods:
            raise self._refuse(f"{method} {path} is not allowed (policy mounts.{self.spec.name}.methods "
                               f"allows {', '.join(self.spec.methods)})")
        url = self._url(path)
        request = self._request(method, url, body)
        with span("ubertool.mount.request", mount=self.spec.name, method=method) as current:
            try:
                # A read is sent once per run; its answer stands until a write to the same URL.
                response = self._recorder.exchange("http", request, lambda: self._perform(method, url, body),
                                                   reusable=method == "GET")
            except ReplayMismatch as exc:
                with self._lock:
                    self._notes.append(f"mount {self.spec.name}: {exc}")
                raise OSError(errno.EIO, f"{method} {path}: not in the recording") from None
            current.set_attribute("http.response.status_code", response.get("status") or 0)
            if response.get("error") is not None:
                failed(current, str(response["error"]))
        if method != "GET" and response.get("status") is not None:
            self._recorder.forget("http", self._request("GET", url, None))
        return self._answer(response, method, path)

    def _failed(self, kind: type[OSError], number: int, what: str) -> OSError:
        """An error for the guest, with `what` kept as a note of the cell."""
        with self._lock:
            self._notes.append(f"mount {self.spec.name}: {what}")
        return kind(number, what)

    def _request(self, method: str, url: str, body: bytes | None) -> Json:
        return {"mount": self.spec.name, "method": method, "url": url,
                "body_sha256": hashlib.sha256(body).hexdigest() if body is not None else None}

    def _answer(self, response: Json, method: str, path: str) -> Body | bytes:
        status, error = response.get("status"), response.get("error")
        if error == "refused":
            raise self._refuse(response.get("message", "refused"))
        # The guest sees only an errno; what happened goes to the cell's [ubertool] notes.
        if error == "timeout":
            raise self._failed(TimeoutError, errno.ETIMEDOUT, f"{method} {path} timed out after "
                               f"{self.spec.timeout_s:g} s (mounts.{self.spec.name}.timeout_s)")
        if error == "too_large":
            raise self._failed(OSError, errno.EFBIG,
                               f"{path}: over the mount's max_bytes ({self.spec.max_bytes})")
        if error is not None:
            raise self._failed(OSError, errno.EIO,
                               f"{method} {path} failed: {response.get('message', error)}")
        if status == 404:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if status in (401, 403, 405):
            raise self._failed(PermissionError, errno.EACCES, f"{method} {path} answered HTTP {status} "
                               f"{_REASONS.get(status, '')}".rstrip())
        if status is None or not 200 <= status < 300:
            raise self._failed(OSError, errno.EIO, f"{method} {path} answered HTTP {status}")
        return response.get("body", b"")

    def _perform(self, method: str, url: str, body: bytes | None) -> Json:
        """Send one request (following same-origin redirects, retrying idempotent failures)."""
        started = time.monotonic()
        outcome: Json
        try:
            outcome = self._send_with_retries(method, url, body)
        except _Refused as exc:
            outcome = {"error": "refused", "message": exc.strerror or str(exc)}
        except CredentialError as exc:
            outcome = {"error": "refused", "message": str(exc)}
        self._audit(method, url, outcome, body, time.monotonic() - started)
        return outcome

    def _send_with_retries(self, method: str, url: str, body: bytes | None) -> Json:
        attempts = 1 + (self.spec.retries if method in _IDEMPOTENT else 0)
        outcome: Json = {}
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            outcome = self._send(method, url, body)
            retry = outcome.get("status") in _RETRY_STATUS or outcome.get("error") in ("network", "timeout")
            if not retry:
                break
        return outcome

    def _send(self, method: str, url: str, body: bytes | None) -> Json:
        target = url
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                status, data, location = self._exchange_once(method, target, body)
            except httpx.TimeoutException:
                return {"error": "timeout"}
            except httpx.HTTPError as exc:
                return {"error": "network", "message": type(exc).__name__}
            except _TooLarge:
                return {"error": "too_large"}
            if location is None:
                return {"status": status, "body": data, "bytes": data.size}
            target = self._within_base(urljoin(target, location))
        raise _Refused(errno.EPERM, f"more than {_MAX_REDIRECTS} redirects from {url}")

    def _exchange_once(self, method: str, url: str, body: bytes | None) -> tuple[int, Body, str | None]:
        """One request; the response body streams into the run's spool (capped), not memory."""
        headers = {}
        if self.spec.credential and self._credentials is not None:
            name, value = self._credentials.header(self.spec.credential, method=method)
            headers[name] = value
        with self._http.stream(method, url, content=body, headers=headers) as response, \
                self._spool.writer() as spooled:
            if response.is_redirect:
                return response.status_code, spooled.done(), response.headers.get("location", "")
            declared = int(response.headers.get("content-length") or 0)
            if declared > self.spec.max_bytes:
                raise _TooLarge
            for chunk in response.iter_bytes():  # decoded: a decompression bomb is cut here too
                if spooled.size + len(chunk) > self.spec.max_bytes:
                    raise _TooLarge
                spooled.write(chunk)
            data = spooled.done()
        # A secret may span chunks: redact the whole body, once (transiently in memory), when
        # the run has secrets at all.
        if data.size and self._redactor.active:
            raw = data.read()
            clean = self._redactor.data(raw)
            if clean != raw:
                data = self._spool.put(clean)
        return response.status_code, data, None

    def _within_base(self, url: str) -> str:
        """`url`, a redirect's target, if it is on the mount's origin and under its base path."""
        parts = urlsplit(url)
        where = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        if (parts.scheme, parts.hostname, parts.port) != (self._origin.scheme, self._origin.hostname,
                                                           self._origin.port):
            raise _Refused(errno.EPERM, f"redirect to another origin refused: {where}")
        segments = unquote(parts.path).split("/")
        if not parts.path.startswith(self._prefix) or any(s in (".", "..") for s in segments):
            raise _Refused(errno.EPERM, f"redirect out of the base URL's path {self._prefix} refused: "
                                        f"{parts.path[:200]}")
        return url

    def _check_address(self, host: str, address: str) -> None:
        """Refuse connecting to `address` (one `host` resolved to) if it is not global, unless
        the policy names an address itself or allows private ones."""
        try:
            ipaddress.ip_address(host.strip("[]"))
            return  # an address literal the policy itself names: allowed as written
        except ValueError:
            pass
        if not self.spec.allow_private and is_private(address):
            raise _Refused(errno.EPERM, f"{host} resolves to a private address {address}; "
                                        f"set mounts.{self.spec.name}.allow_private to allow it")

    def _audit(self, method: str, url: str, outcome: Json, body: bytes | None, seconds: float) -> None:
        parts = urlsplit(url)
        credential = self.spec.credential
        scope = self._credentials.scope(credential) if credential and self._credentials else None
        self._on_event("http_request", mount=self.spec.name, method=method,
                       url=f"{parts.scheme}://{parts.netloc}{parts.path}", status=outcome.get("status"),
                       error=outcome.get("error"), bytes_in=outcome.get("bytes"),
                       bytes_out=len(body) if body is not None else None, duration_s=round(seconds, 6),
                       credential=credential, scope=scope)


def _size(body: Body | bytes) -> int:
    return body.size if isinstance(body, Body) else len(body)


class _TooLarge(Exception):
    pass
