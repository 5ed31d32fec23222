"""A small form app on 127.0.0.1 for the browser tests: a form, a page that loads a resource
from another origin, and an endpoint that needs a bearer token."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FORM = b"""<!doctype html><html><head><title>Greeter</title></head><body>
<h1>Greeter</h1>
<input id="name" placeholder="your name">
<button id="go" onclick="document.querySelector('#result').textContent = 'Hello, ' +
  document.querySelector('#name').value + '!'">Greet</button>
<p id="result"></p>
<p id="secret"></p>
<script>
fetch('/api/whoami').then(r => r.text()).then(t => document.querySelector('#secret').textContent = t);
</script>
</body></html>"""


def leaky_page(other: str) -> bytes:
    return (f"<!doctype html><html><head><title>Leaky</title></head><body><p>hi</p>"
            f"<img src='{other}/pixel.png'></body></html>").encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/":
            body, kind = FORM, "text/html"
        elif self.path == "/leaky":
            body, kind = leaky_page(self.server.other), "text/html"
        elif self.path == "/api/whoami":
            auth = self.headers.get("Authorization") or ""
            body = b"signed in" if auth == f"Bearer {self.server.token}" else b"anonymous"
            kind = "text/plain"
        else:
            body, kind = b"", "image/png"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[tuple[str, str | None]]
    other: str
    token: str


@contextmanager
def serve_form(host: str = "127.0.0.1", token: str = "", other: str = "") -> Iterator[_Server]:
    server = _Server((host, 0), _Handler)
    server.seen, server.other, server.token = [], other, token
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def url_of(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"
