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


def install(*requirements: str) -> list:
    """Install pure-Python packages the policy allows (`[packages] allow`, with
    `guest_install = true`) into this session: `ubertool.install("tabulate")`, or with
    versions, `ubertool.install("sympy>=1.12")`. The host fetches them (their dependencies too),
    places them read-only on the import path, and they import as usual. Built-in packages
    (numpy, pandas, ...) are never replaced. Returns the `name==version` of each package now
    installed; raises if one is not allowed or not pure Python."""
    import importlib

    from host import tools

    answer = tools.install_package(requirements=list(requirements))
    importlib.invalidate_caches()  # the package folder changed under the import system
    return answer["installed"]


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


def _told(answer: dict) -> dict:
    import sys

    for url in answer.get("blocked", ()):
        print(f"ubertool.browser: blocked {url} (origin not in tools.browser.origins)", file=sys.stderr)
    return answer


class _Browser:
    """A browser the host drives for you (policy `[tools.browser]`): only the policy's origins
    load; other requests are blocked and reported on stderr. `browser.goto(url)`,
    `browser.fill("#name", "Ada")`, `browser.click("button")`, `browser.text("#result")`,
    `browser.screenshot("page.png")` (saved in the workspace), `browser.url`, `browser.title`."""

    def goto(self, url: str) -> dict:
        return _told(_tools().browser_goto(url=url))

    def _act(self, action: str, selector: str, value: str = "", timeout: float | None = None) -> dict:
        return _told(_tools().browser_act(action=action, selector=selector, value=value, timeout_s=timeout))

    def click(self, selector: str, timeout: float | None = None) -> dict:
        return self._act("click", selector, timeout=timeout)

    def fill(self, selector: str, text: str, timeout: float | None = None) -> dict:
        return self._act("fill", selector, text, timeout)

    def press(self, selector: str, key: str, timeout: float | None = None) -> dict:
        return self._act("press", selector, key, timeout)

    def wait_for(self, selector: str, timeout: float | None = None) -> dict:
        return self._act("wait_for", selector, timeout=timeout)

    def text(self, selector: str = "body") -> str:
        return _told(_tools().browser_text(selector=selector))["text"]

    inner_text = text

    def evaluate(self, expression: str):
        return _told(_tools().browser_evaluate(expression=expression))["value"]

    def screenshot(self, name: str = "screenshot.png") -> str:
        return _told(_tools().browser_screenshot(name=name))["path"]

    @property
    def url(self) -> str:
        return _tools().browser_state()["url"]

    @property
    def title(self) -> str:
        return _tools().browser_state()["title"]


browser = _Browser()
