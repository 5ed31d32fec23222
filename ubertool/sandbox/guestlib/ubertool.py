"""ubertool: what this sandbox is and what it can reach. Start with `ubertool.about()`.

This module lives inside the sandbox. The sandbox runs CPython on WebAssembly: there is no
network, no subprocess and no thread; the only host folders are the ones `about()` lists.
Figures left open at the end of a cell (matplotlib) are returned as images.
"""

ABOUT = "(the host did not describe this sandbox)"


def about() -> None:
    """Print the folders this sandbox sees, its limits, and how state is kept."""
    print(ABOUT)


def save_playbook(name: str, description: str = "", params: dict | None = None) -> dict:
    """Save this session's successful cells as a playbook: a Python script a person replays
    from a shell (`ubertool replay`), in this same sandbox and policy, without you.

    Failed cells are left out and cells that only look at data become comments. `params` are
    top-level variables a person may override when replaying, with their default values:
    `save_playbook("sales-by-region", "Totals per region", params={"region": "EMEA"})`.
    Returns where the playbook was written and how to replay it.
    """
    from host import tools

    return tools.save_playbook(name=name, description=description, params=params or {})


def _tools():
    from host import tools

    return tools


class Program:
    """A program the host runs for you (policy `[tools.programs.NAME]`), driven like pexpect:
    `p = programs.spawn("sqlite"); p.sendline("select 1;"); p.expect("sqlite> "); p.before`."""

    def __init__(self, name: str, args: tuple = ()) -> None:
        info = _tools().programs_spawn(name=name, args=list(args))
        self.name, self.handle, self.pid = name, info["handle"], info["pid"]
        self.before = self.after = ""
        self.exitstatus = None

    def send(self, text: str) -> int:
        """Type `text` into the program (no newline added)."""
        return _tools().programs_send(handle=self.handle, text=text)["sent"]

    def sendline(self, text: str = "") -> int:
        """Type `text` and a newline."""
        return self.send(text + "\n")

    def expect(self, pattern, timeout: float | None = None) -> int:
        """Wait for a regular expression (or the first of a list); sets `before` and `after`,
        returns the index of the pattern that matched. Raises on a timeout or end of output."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        found = _tools().programs_expect(handle=self.handle, patterns=patterns, timeout_s=timeout)
        self.before, self.after = found["before"], found["after"]
        return found["index"]

    def read_nonblocking(self, size: int = 65536, timeout: float = 0.0) -> str:
        """What the program printed and nobody read yet, without waiting for a pattern."""
        return _tools().programs_read(handle=self.handle, size=size, timeout_s=timeout)["text"]

    def close(self) -> None:
        """End the program; sets `exitstatus`."""
        self.exitstatus = _tools().programs_close(handle=self.handle)["exit_status"]


class _Programs:
    """Allowlisted host programs. `programs.spawn(name, args=())` starts one."""

    def spawn(self, name: str, args: tuple = ()) -> Program:
        return Program(name, tuple(args))


class _Server:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, tool: str):
        def call(**arguments):
            return mcp.call(self._name, tool, **arguments)
        call.__name__ = tool
        return call


class _Mcp:
    """Tools of other MCP servers the policy allows (`[tools.mcp.NAME]`), as Python calls:
    `mcp.servers()`, `mcp.tools("github", query="issue")`, `mcp.call("github", "search", q="x")`
    or `mcp["github"].search(q="x")`. A call returns the tool's structured result (or its
    text when it has none) and raises when the tool fails."""

    def servers(self) -> list:
        return _tools().mcp_servers()

    def tools(self, server: str, query: str | None = None) -> list:
        return _tools().mcp_tools(server=server, query=query)

    def call(self, server: str, tool: str, **arguments):
        answer = _tools().mcp_call(server=server, tool=tool, arguments=arguments)
        return answer["structured"] if answer["structured"] is not None else answer["text"]

    def __getitem__(self, server: str) -> _Server:
        return _Server(server)


programs = _Programs()
mcp = _Mcp()
