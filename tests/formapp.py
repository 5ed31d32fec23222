"""A small form app on 127.0.0.1 for the browser tests: a form, a page that loads a resource
from another origin, an endpoint that needs a bearer token, and what an attacker plants: an
open redirect, a page that reads another origin, WebSockets (from the page and a Worker), and a
page that echoes the token it was sent, encoded."""

from __future__ import annotations

import base64
import html
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

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


CROSS = """<!doctype html><title>Cross</title><p id="out"></p><script>
fetch({to}).then(r => r.text()).then(t => document.querySelector('#out').textContent = t)
  .catch(e => document.querySelector('#out').textContent = 'failed');
</script>"""

SOCKETS = """<!doctype html><title>Sockets</title><p id="page"></p><p id="worker"></p><script>
const mark = id => document.querySelector('#' + id).textContent = 'closed';
const s = new WebSocket({to});
s.onopen = () => s.send('page data');
s.onclose = () => mark('page');
const w = new Worker('/socket-worker.js?to=' + encodeURIComponent({to}));
w.onmessage = () => mark('worker');
</script>"""

SOCKET_WORKER = """const to = new URLSearchParams(location.search).get('to');
const s = new WebSocket(to);
s.onopen = () => s.send('worker data');
s.onclose = () => postMessage('closed');
"""


def echo_page(auth: str) -> bytes:
    """The token a page was sent, in its title and in the encodings an echo might use."""
    raw = auth.encode()
    forms = {"b64": base64.b64encode(raw).decode(), "url": quote(auth, safe=""),
             "json": json.dumps({"auth": auth}), "hex": raw.hex()}
    body = "".join(f"<p id='{k}'>{html.escape(v)}</p>" for k, v in forms.items())
    return f"<!doctype html><title>{html.escape(auth)}</title>{body}".encode()


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
        path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
        to = query.get("to", [""])[0]
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/":
            body, kind = FORM, "text/html"
        elif path == "/cross":
            body, kind = CROSS.format(to=json.dumps(to)).encode(), "text/html"
        elif path == "/sockets":
            body, kind = SOCKETS.format(to=json.dumps(to)).encode(), "text/html"
        elif path == "/socket-worker.js":
            body, kind = SOCKET_WORKER.encode(), "text/javascript"
        elif path == "/echo":
            body, kind = echo_page(self.headers.get("Authorization") or ""), "text/html"
        elif path == "/leaky-redirect":
            img = f"<img src='/redirect?to={self.server.other}/pixel.png'>"
            body, kind = f"<title>Leaky</title>{img}".encode(), "text/html"
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
        self.send_header("Access-Control-Allow-Origin", "*")  # any page may read what it is given
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
