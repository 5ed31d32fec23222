"""Starting `ubertool serve --transport http` on a loopback port, for tests and benchmarks."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_http_server(command: str, env: Mapping[str, str], args: Sequence[str] = (), *,
                      port: int | None = None, stderr: IO[bytes] | None = None,
                      ) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server and wait (60 s at most) until it answers HTTP; returns it and its /mcp URL.
    Its error output goes to `stderr` when given (a file the caller reads), else it is kept only
    to explain a failed start.

    Raises:
        RuntimeError: the server exited or did not answer in time (with its error output).
    """
    port = port or free_port()
    # The server's stderr goes to a file read only if it fails to start; the server keeps its own
    # descriptor when ours is closed.
    with nullcontext(stderr) if stderr is not None else tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([command, "serve", "--transport", "http", "--port", str(port), *args],
                                env=dict(env), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            except urllib.error.HTTPError:
                return proc, f"http://127.0.0.1:{port}/mcp"  # it answers HTTP
            except OSError:
                time.sleep(0.1)
                continue
            return proc, f"http://127.0.0.1:{port}/mcp"
    proc.kill()
    raise RuntimeError("the server did not answer within 60 s")
