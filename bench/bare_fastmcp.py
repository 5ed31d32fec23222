"""A fastmcp server with one trivial `python` tool and no sandbox: the MCP stack's own floor."""

from fastmcp import FastMCP

server = FastMCP("bare")


@server.tool
async def python(code: str) -> str:
    """Answer at once, running nothing."""
    return "1"


if __name__ == "__main__":
    server.run("stdio", show_banner=False)
