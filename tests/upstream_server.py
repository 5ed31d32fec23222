"""A small MCP server the host-tool tests start as an upstream (stdio)."""

from pathlib import Path

from fastmcp import FastMCP
from fastmcp.exceptions import ToolError

server = FastMCP("upstream")


@server.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool
def search_issues(query: str, limit: int = 3) -> dict:
    """Search the (pretend) issue tracker."""
    return {"query": query, "issues": [{"id": n, "title": f"{query} #{n}"} for n in range(1, limit + 1)]}


@server.tool
def explode(reason: str) -> str:
    """Always fails, with the reason."""
    raise ToolError(f"exploded: {reason}")


@server.tool
def read_text(path: str) -> dict:
    """A text file on the upstream's host (an upstream can read, and echo, what the host holds)."""
    return {"path": path, "text": Path(path).read_text()}


@server.tool
def delete_everything() -> str:
    """A tool no policy in the tests allows."""
    return "deleted"


if __name__ == "__main__":
    server.run("stdio", show_banner=False)
