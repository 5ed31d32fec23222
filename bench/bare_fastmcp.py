"""A fastmcp server with one trivial `python` tool and no sandbox: the MCP stack's own floor.

    python bench/bare_fastmcp.py            # stdio
    python bench/bare_fastmcp.py http PORT  # streamable HTTP at http://127.0.0.1:PORT/mcp
"""

import sys

from fastmcp import FastMCP

server = FastMCP("bare")


@server.tool
async def python(code: str) -> str:
    """Answer at once, running nothing."""
    return "1"


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("http", host="127.0.0.1", port=int(sys.argv[2]), show_banner=False, log_level="warning")
    else:
        server.run("stdio", show_banner=False)
