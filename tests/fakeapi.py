"""A real HTTP server on 127.0.0.1 for the mount tests: a small resource API, an OAuth token
endpoint, and the misbehaviours a backend can have (slow, 500, redirects, bombs, truncation)."""

from __future__ import annotations

import gzip
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


@dataclass
class ApiState:
    files: dict[str, bytes] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, auth
    hits: dict[str, int] = field(default_factory=dict)
    required_token: str | None = None  # a static bearer token the /v1 tree requires
    issued: list[str] = field(default_factory=list)
    token_requests: list[dict[str, list[str]]] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    token_ttl_s: int = 3600
    other_origin: str = ""  # where /v1/redirect-out points

    def valid(self, auth: str | None) -> bool:
        tokens = set(self.issued) | ({self.required_token} if self.required_token else set())
        return bool(auth) and auth.removeprefix("Bearer ") in tokens


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as written, not 40 ms apart

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        state = self.server.state
        path = self.path.split("?")[0]
        auth = self.headers.get("Authorization")
        state.log.append((method, path, auth))
        state.hits[path] = state.hits.get(path, 0) + 1
        if path == "/token":
            return self._token()
        if path == "/revoke":
            state.revoked.append(parse_qs(self._body().decode())["token"][0])
            return self._send(200)
        if not path.startswith("/v1/"):
            return self._send(404)
        if (state.required_token or state.issued) and not state.valid(auth) and path != "/v1/echo-auth":
            return self._send(401, b"token required")
        name = path.removeprefix("/v1")
        special = _SPECIAL.get(name)
        if special is not None and method == "GET":
            return special(self, state)
        if method == "GET":
            data = state.files.get(name)
            return self._send(200, data) if data is not None else self._send(404, b"not found")
        if method in ("PUT", "POST"):
            state.files[name] = self._body()
            return self._send(201 if method == "PUT" else 200)
        if method == "DELETE":
            return self._send(204) if state.files.pop(name, None) is not None else self._send(404)
        return self._send(405)

    def _token(self) -> None:
        state = self.server.state
        form = parse_qs(self._body().decode())
        state.token_requests.append(form)
        if form.get("client_secret", [""])[0] != "s3cret-client" and "subject_token" not in form:
            return self._send(401, b'{"error": "invalid_client"}')
        token = "tok-" + secrets.token_hex(12)
        state.issued.append(token)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": state.token_ttl_s,
                "scope": form.get("scope", [""])[0]}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def _slow(handler: _Handler, state: ApiState) -> None:
    time.sleep(3)
    handler._send(200, b"late")


def _bomb(handler: _Handler, state: ApiState) -> None:
    body = gzip.compress(b"\0" * (64 * 2**20))
    handler._send(200, body, {"Content-Encoding": "gzip", "Content-Length": str(len(body))})


def _truncated(handler: _Handler, state: ApiState) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b"only ten b")
    handler.close_connection = True


def _reset(handler: _Handler, state: ApiState) -> None:
    # Linger 0 makes close() send a TCP reset instead of an orderly end.
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()
    handler.close_connection = True


def _garbage(handler: _Handler, state: ApiState) -> None:
    handler.wfile.write(b"\x00\x01 this is not HTTP at all \xff\r\n\r\n")
    handler.close_connection = True


def _counter(handler: _Handler, state: ApiState) -> None:
    handler._send(200, str(state.hits["/v1/counter"]).encode())


_SPECIAL = {
    "/slow": _slow,
    "/fail": lambda h, s: h._send(500, b"boom"),
    "/big": lambda h, s: h._send(200, b"x" * (2 * 2**20)),
    "/bomb": _bomb,
    "/truncated": _truncated,
    "/counter": _counter,
    "/reset": _reset,
    "/garbage": _garbage,
    "/echo-auth": lambda h, s: h._send(200, (h.headers.get("Authorization") or "none").encode()),
    "/redirect-out": lambda h, s: h._send(302, b"", {"Location": s.other_origin + "/v1/hello.txt"}),
    "/redirect-in": lambda h, s: h._send(302, b"", {"Location": "/v1/hello.txt"}),
    "/redirect-up": lambda h, s: h._send(302, b"", {"Location": "/admin/secret"}),
    "/redirect-dots": lambda h, s: h._send(302, b"", {"Location": "/v1/%2e%2e/admin/secret"}),
    # An echo of the token the request carried, in the user info of a redirect elsewhere.
    "/redirect-userinfo": lambda h, s: h._send(302, b"", {"Location": s.other_origin.replace(
        "://", f"://user:{(h.headers.get('Authorization') or '').removeprefix('Bearer ')}@") + "/x"}),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ApiState


@contextmanager
def serve_api(host: str = "127.0.0.1") -> Iterator[tuple[str, ApiState]]:
    """A running server; yields its base URL (`http://127.0.0.1:PORT`) and its state."""
    server = _Server((host, 0), _Handler)
    server.state = ApiState()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
