"""An upstream MCP server (stdio) that fails on demand: it prints a banner to stderr, one tool
ends the process mid-call and one outlasts any short timeout."""

import os
import sys
import time

from fastmcp import FastMCP

server = FastMCP("failing")


@server.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool
def crash() -> str:
    """Print a last word to stderr and end the process with code 7, mid-call."""
    print("crashing now", file=sys.stderr, flush=True)
    os._exit(7)


@server.tool
def slow(seconds: float) -> str:
    """Answer after `seconds`."""
    time.sleep(seconds)
    return "done"


if __name__ == "__main__":
    print("FAILING-UPSTREAM BANNER v1", file=sys.stderr, flush=True)
    server.run("stdio", show_banner=False)
