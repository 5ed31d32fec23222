"""Other MCP servers' tools, callable from sandbox code as Python functions.

Policy `[tools.mcp.NAME]` names a server (a stdio `command`, or an HTTP `url` with an optional
credential the host attaches) and the tools the guest may call (`allow`, glob patterns). The
guest lists and searches them with their schemas and calls them, getting structured results:
many MCP tools become one code API instead of many tool definitions in the model's context.
Clients connect at first use, on one event-loop thread of the broker's own, and close with it.

A stdio upstream's stderr never reaches the terminal or the guest: it goes to a bounded file in
the run's folder (`mcp-NAME.stderr`). When an upstream cannot start, exits, or times out, the
guest gets a `ToolFailure` saying which and how (never the stderr itself, host data), and the
audit gets an `mcp_failed` event with the stderr's last lines (redacted like every audit line).
An upstream that exited is started again by the next call.
"""

from __future__ import annotations

import fnmatch
import os
import re
import secrets
import shutil
import threading
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from anyio.from_thread import BlockingPortal
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ubertool.tools import ToolFailure
from ubertool.tools.broker import Broker
from ubertool.tools.credentials import CredentialBroker, CredentialError
from ubertool.tools.files import open_private
from ubertool.tools.recorder import Recorder
from ubertool.tools.redact import Redactor


class UpstreamSpec(BaseModel):
    """One upstream MCP server and what of it the guest may use."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    command: tuple[str, ...] | None = Field(None, strict=False)
    cwd: str | None = None  # where `command` runs; relative to the policy file, whose folder is the default
    url: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    credential: str | None = None
    allow: tuple[str, ...] = Field(strict=False)  # tool-name globs; nothing else is callable
    timeout_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_transport(self) -> UpstreamSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("command: give exactly one of command (stdio) or url (HTTP)")
        if self.command is not None and not self.command:
            raise ValueError("command: must name a program")
        return self


STDERR_LIMIT = 1 << 20  # bytes of one upstream's stderr kept per run; the rest is dropped
TAIL_LINES = 10  # of stderr, in the audit when an upstream fails
_EXIT_MARK = "ubertool-upstream-exit"
_LINE_MAX = 65536  # bytes of a line without a newline kept (and redacted) as one piece
START_S = 30.0  # the least time an upstream gets to start and answer `initialize`


class StderrLog:
    """One stdio connection's stderr: a pipe the upstream writes to, drained by a thread into
    `path` (appended, at most `limit` bytes in all, then a note; later output is read and
    dropped so the upstream never blocks), keeping its last lines; both pass through `redact`
    (the run's secrets) line by line. Use as a context manager; `writer` is the pipe's end to
    give the upstream, `spawned()` closes this process's copy.

    The upstream runs under `sh -c`, which writes `_EXIT_MARK NONCE CODE` when it ends: the
    code is kept (`exit_code`), and the per-connection nonce keeps text the upstream merely
    relays (a guest's arguments echoed in an error) from faking it. The upstream itself can
    (it is the operator's program; a wrong code is all it gains).
    """

    def __init__(self, path: Path, redact: Callable[[str], str], limit: int = STDERR_LIMIT) -> None:
        self.path = path
        self._redact = redact
        self.nonce = secrets.token_hex(8)
        self._limit = limit
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._code: int | None = None
        self._ended = threading.Event()  # the exit code came, or stderr ended
        self._stack = ExitStack()
        self.writer: IO[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrLog:
        with ExitStack() as stack:  # closed in reverse: our pipe end, the thread, the rest
            file = stack.enter_context(open(open_private(self.path, os.O_WRONLY | os.O_APPEND), "ab"))
            read_end, write_end = os.pipe()
            reader = stack.enter_context(open(read_end, "rb", buffering=0))
            self._thread = threading.Thread(target=self._drain, args=(reader, file), daemon=True,
                                            name=f"stderr {self.path.name}")
            stack.callback(self._thread.join, 5)  # an upstream's child may hold stderr: not forever
            self.writer = stack.enter_context(open(write_end, "w"))
            self._thread.start()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.spawned()
        self._stack.close()

    def spawned(self) -> None:
        """Close this process's end of the pipe (the upstream keeps its own): its end is the
        end of stderr."""
        if self.writer is not None:
            self.writer.close()

    def exit_code(self, wait_s: float) -> int | None:
        """The upstream's exit code, waiting up to `wait_s` for its stderr to end; None while
        it runs (or it left a child holding stderr)."""
        self._ended.wait(wait_s)
        return self._code

    def tail(self) -> list[str]:
        """Its last lines (each cut to 300 characters)."""
        return list(self._tail)

    def _drain(self, reader: IO[bytes], file: IO[bytes]) -> None:
        try:
            self._copy(reader, file)
        finally:
            self._ended.set()

    def _copy(self, reader: IO[bytes], file: IO[bytes]) -> None:
        room = max(0, self._limit - file.tell())
        pending = b""
        while chunk := reader.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > _LINE_MAX:  # a line this long is kept in pieces
                lines.append(pending)
                pending = b""
            for raw in lines:
                room = self._keep(raw.decode("utf-8", "replace"), file, room)
        if pending:
            self._keep(pending.decode("utf-8", "replace"), file, room)

    def _keep(self, line: str, file: IO[bytes], room: int) -> int:
        """Keep one line, redacted: the exit mark as the code, any other in the tail and, while
        `room` (bytes) is left, in the file. Returns the room left."""
        mark = f"{_EXIT_MARK} {self.nonce} "
        if line.startswith(mark) and line[len(mark):].strip().isdigit():
            self._code = int(line[len(mark):])
            self._ended.set()
            return room
        line = self._redact(line.rstrip())
        if line:
            self._tail.append(line[:300])
        if not room:
            return 0
        data = (line + "\n").encode()
        file.write(data[:room])
        if len(data) > room:
            file.write(b"\n[ubertool: stderr cut here, at the run's limit]\n")
        file.flush()
        return max(0, room - len(data))


def _under_sh(command: tuple[str, ...], nonce: str) -> tuple[str, list[str]]:
    """`command` run by `sh -c`, which reports its exit code on stderr (see `StderrLog`)."""
    script = f'"$@"; code=$?; echo "{_EXIT_MARK} {nonce} $code" >&2; exit $code'
    return "/bin/sh", ["-c", script, "sh", *command]


def _missing_program(spec: UpstreamSpec) -> str | None:
    """Why `spec.command`'s program cannot run (not found, not executable), or None."""
    program = (spec.command or ("",))[0]
    if "/" in program:
        path = Path(spec.cwd or ".", program)
        if not path.is_file():
            return f"command {program!r} not found (looked in {spec.cwd or os.getcwd()})"
        if not os.access(path, os.X_OK):
            return f"command {program!r} is not executable"
        return None
    search = spec.env.get("PATH", os.environ.get("PATH", os.defpath))
    if shutil.which(program, path=search) is None:
        return f"command {program!r} not found on PATH"
    return None


def _timed_out(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is a timeout (fastmcp wraps them)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, TimeoutError) or "timed out" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@dataclass
class _Connection:
    """A connected client with what closes it and, for stdio, its stderr."""

    client: Any
    stack: ExitStack
    stderr: StderrLog | None = None


class UpstreamBroker(Broker):
    """The run's upstream MCP clients; use as a context manager (leaving it closes them).
    `logs` is the run's folder, where each stdio upstream's stderr is kept."""

    prefix = "mcp"

    def __init__(self, specs: dict[str, UpstreamSpec], *, logs: Path, credentials: CredentialBroker | None,
                 recorder: Recorder, redactor: Redactor, on_event: Callable[..., None] | None = None) -> None:
        super().__init__(recorder=recorder, redactor=redactor, on_event=on_event)
        self._specs = specs
        self._logs = logs
        self._credentials = credentials
        self._connections: dict[str, _Connection] = {}

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for connection in connections:  # before the event loop they run on stops
            connection.stack.close()
        super().__exit__(*exc)

    def tools(self) -> tuple[Callable[..., Any], ...]:
        return (self.mcp_servers, self.mcp_tools, self.mcp_call)

    # -- the tools ---------------------------------------------------------------------------

    def mcp_servers(self) -> list[str]:
        """The upstream MCP servers this sandbox may use."""
        return sorted(self._specs)

    def mcp_tools(self, server: str, query: str | None = None) -> list[dict[str, Any]]:
        """The tools of an upstream server that you may call, with their input schemas.

        Args:
            server: The server's name (see mcp_servers).
            query: Keep only tools whose name or description contains this text.
        """
        answer = self._recorded("tools", {"server": server, "query": query},
                                lambda: {"tools": self._list(server, query)})
        return answer["tools"]

    def mcp_call(self, server: str, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call an upstream tool; returns its structured result and text.

        Args:
            server: The server's name.
            tool: The tool's name.
            arguments: Its arguments, as its input schema says.
        """
        return self._recorded("call", {"server": server, "tool": tool, "arguments": arguments or {}},
                              lambda: self._call(server, tool, arguments or {}))

    # -- the host side -----------------------------------------------------------------------

    def _spec(self, server: str) -> UpstreamSpec:
        spec = self._specs.get(server)
        if spec is None:
            allowed = ", ".join(sorted(self._specs)) or "none"
            raise ToolFailure(f"no MCP server {server!r} in the policy (allowed: {allowed}); "
                              f"an operator adds [tools.mcp.{server}]")
        return spec

    def _allowed(self, server: str, tool: str) -> bool:
        return any(fnmatch.fnmatchcase(tool, pattern) for pattern in self._spec(server).allow)

    def _client(self, server: str) -> tuple[BlockingPortal, Any]:
        """The server's client, connected now if it is not (a failure is a `ToolFailure`)."""
        spec = self._spec(server)
        with self._lock:
            portal = self._event_loop()
            connection = self._connections.get(server)
            if connection is None:
                connection = self._connect(portal, server, spec)
                self._connections[server] = connection
                self._on_event("mcp_connected", server=server)
            return portal, connection.client

    def _connect(self, portal: BlockingPortal, server: str, spec: UpstreamSpec) -> _Connection:
        # fastmcp's client takes about a second to import: only a run that uses it pays that.
        from fastmcp import Client

        if spec.command is not None and (missing := _missing_program(spec)):
            raise self._failed(server, "starting", missing, None)
        with ExitStack() as stack:
            stderr = None
            if spec.command is not None:
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", server)
                stderr = stack.enter_context(StderrLog(self._logs / f"mcp-{name}.stderr",
                                                        self._redactor.text))
            client = Client(self._transport(spec, stderr), timeout=spec.timeout_s,
                            init_timeout=max(spec.timeout_s, START_S))
            try:
                entered = stack.enter_context(portal.wrap_async_context_manager(client))
            except Exception as exc:
                what = self._what(server, exc, stderr, max(spec.timeout_s, START_S))
                raise self._failed(server, "starting", what, stderr) from None
            finally:
                if stderr is not None:
                    stderr.spawned()
            return _Connection(entered, stack.pop_all(), stderr)
        raise AssertionError("unreachable")  # pragma: no cover (for type checkers)

    def _transport(self, spec: UpstreamSpec, stderr: StderrLog | None) -> Any:
        from fastmcp.client.transports import StdioTransport, StreamableHttpTransport

        if spec.command is not None and stderr is not None:
            program, args = _under_sh(spec.command, stderr.nonce)
            return StdioTransport(program, args, env=dict(spec.env), cwd=spec.cwd, keep_alive=False,
                                  log_file=stderr.writer)
        headers = {}
        if spec.credential and self._credentials is not None:
            try:
                name, value = self._credentials.header(spec.credential, method="POST")
            except CredentialError as exc:
                raise ToolFailure(str(exc)) from None
            headers[name] = value
        return StreamableHttpTransport(spec.url or "", headers=headers)

    def _what(self, server: str, exc: Exception, stderr: StderrLog | None, limit_s: float) -> str:
        """What happened to an upstream, from the error a request (or the start) raised."""
        text = self._redactor.text(str(exc))[:200]
        if _timed_out(exc):
            return f"timed out after {limit_s:g} s (policy tools.mcp.{server}.timeout_s)"
        if stderr is not None and (code := stderr.exit_code(wait_s=2.0)) is not None:
            return f"exited with code {code}"
        return f"connection failed ({type(exc).__name__}: {text})"

    def _failed(self, server: str, doing: str, what: str, stderr: StderrLog | None) -> ToolFailure:
        """Audit an upstream's failure (with its stderr's last lines) and say it to the guest:
        which upstream, doing what, what happened; its stderr only to the operator."""
        self._on_event("mcp_failed", server=server, during=doing, what=what,
                       stderr_tail=stderr.tail() if stderr is not None else None,
                       stderr_file=str(stderr.path) if stderr is not None else None)
        where = "; its stderr is kept for the operator with the run's audit log" if stderr is not None else ""
        return ToolFailure(f"MCP server {server!r} failed while {doing}: {what}{where}")

    def _request(self, server: str, doing: str, request: Callable[[Any], Any]) -> Any:
        """`request(client)` on the server's event loop; an upstream that fails is named (and
        one that exited is forgotten, so the next call starts it again)."""
        portal, client = self._client(server)
        try:
            return portal.call(lambda: request(client))
        except Exception as exc:
            with self._lock:
                connection = self._connections.get(server)
            stderr = connection.stderr if connection is not None else None
            what = self._what(server, exc, stderr, self._spec(server).timeout_s)
            if what.startswith("exited") and connection is not None:
                with self._lock:
                    self._connections.pop(server, None)
                connection.stack.close()
                what += "; the next call starts it again"
            raise self._failed(server, doing, what, stderr) from None

    def _list(self, server: str, query: str | None) -> list[dict[str, Any]]:
        tools = self._request(server, "listing its tools", lambda client: client.list_tools())
        found = []
        for tool in tools:
            text = f"{tool.name} {tool.description or ''}".lower()
            if self._allowed(server, tool.name) and (not query or query.lower() in text):
                found.append({"name": tool.name, "description": tool.description or "",
                              "input_schema": tool.input_schema})
        return found

    def _call(self, server: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if not self._allowed(server, tool):
            raise ToolFailure(f"tool {tool!r} of MCP server {server!r} is not allowed (policy "
                              f"tools.mcp.{server}.allow is {list(self._spec(server).allow)})")
        result = self._request(server, f"calling {tool}",
                               lambda client: client.call_tool(tool, arguments, raise_on_error=False))
        text = "".join(getattr(block, "text", "") for block in result.content)
        self._on_event("mcp_call", server=server, tool=tool, is_error=result.is_error)
        if result.is_error:
            raise ToolFailure(f"{server}.{tool} failed: {self._redactor.text(text)[:2000]}")
        structured = result.structured_content
        if isinstance(structured, dict) and list(structured) == ["result"]:
            structured = structured["result"]  # fastmcp wraps a plain return value so
        return {"structured": structured, "text": self._redactor.text(text)}
