"""Other MCP servers' tools, callable from sandbox code as Python functions.

Policy `[tools.mcp.NAME]` names a server (a stdio `command`, or an HTTP `url` with an optional
credential the host attaches) and the tools the guest may call (`allow`, glob patterns). The
guest lists and searches them with their schemas and calls them, getting structured results:
many MCP tools become one code API instead of many tool definitions in the model's context.
Clients connect at first use, on one event-loop thread of the broker's own, and close with it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from anyio.from_thread import BlockingPortal
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ubertool.tools import ToolFailure
from ubertool.tools.broker import Broker
from ubertool.tools.credentials import CredentialBroker, CredentialError
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


class UpstreamBroker(Broker):
    """The run's upstream MCP clients; use as a context manager (leaving it closes them)."""

    prefix = "mcp"

    def __init__(self, specs: dict[str, UpstreamSpec], *, credentials: CredentialBroker | None,
                 recorder: Recorder, redactor: Redactor, on_event: Callable[..., None] | None = None) -> None:
        super().__init__(recorder=recorder, redactor=redactor, on_event=on_event)
        self._specs = specs
        self._credentials = credentials
        self._clients: dict[str, Any] = {}

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
        spec = self._spec(server)
        with self._lock:
            portal = self._event_loop()
            client = self._clients.get(server)
            if client is None:
                client = self._stack.enter_context(self._connect(portal, spec))
                self._clients[server] = client
                self._on_event("mcp_connected", server=server)
            return portal, client

    def _connect(self, portal: BlockingPortal, spec: UpstreamSpec) -> AbstractContextManager[Any]:
        # fastmcp's client takes about a second to import: only a run that uses it pays that.
        from fastmcp import Client
        from fastmcp.client.transports import StdioTransport, StreamableHttpTransport

        if spec.command is not None:
            transport: Any = StdioTransport(spec.command[0], list(spec.command[1:]), env=dict(spec.env),
                                            cwd=spec.cwd)
        else:
            headers = {}
            if spec.credential and self._credentials is not None:
                try:
                    name, value = self._credentials.header(spec.credential, method="POST")
                except CredentialError as exc:
                    raise ToolFailure(str(exc)) from None
                headers[name] = value
            transport = StreamableHttpTransport(spec.url or "", headers=headers)
        return portal.wrap_async_context_manager(Client(transport, timeout=spec.timeout_s))

    def _list(self, server: str, query: str | None) -> list[dict[str, Any]]:
        portal, client = self._client(server)
        try:
            tools = portal.call(client.list_tools)
        except Exception as exc:
            raise ToolFailure(f"MCP server {server!r} did not list its tools: {type(exc).__name__}") from None
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
        portal, client = self._client(server)
        try:
            result = portal.call(lambda: client.call_tool(tool, arguments, raise_on_error=False))
        except Exception as exc:
            raise ToolFailure(f"calling {server}.{tool} failed: {type(exc).__name__}: "
                              f"{self._redactor.text(str(exc))[:500]}") from None
        text = "".join(getattr(block, "text", "") for block in result.content)
        self._on_event("mcp_call", server=server, tool=tool, is_error=result.is_error)
        if result.is_error:
            raise ToolFailure(f"{server}.{tool} failed: {self._redactor.text(text)[:2000]}")
        structured = result.structured_content
        if isinstance(structured, dict) and list(structured) == ["result"]:
            structured = structured["result"]  # fastmcp wraps a plain return value so
        return {"structured": structured, "text": self._redactor.text(text)}
