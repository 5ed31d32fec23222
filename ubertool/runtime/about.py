"""Words for the model: the tool's description and the guest's `ubertool.about()`, from the policy."""

from __future__ import annotations

from urllib.parse import urlsplit

from ubertool.runtime.policy import DirMount, Policy
from ubertool.tools.mounts.spec import HttpMountSpec

PACKAGES = "numpy, pandas, scipy, scikit-learn, statsmodels, matplotlib, lxml"


def folders(policy: Policy) -> str:
    """One line per folder the guest has: the workspace, grants and every mount, with what it is."""
    lines = [f"- {policy.workspace.guest_path}: writable, this session's own files"]
    lines += [f"- {grant.guest}: read-only host folder" for grant in policy.grants]
    for mount in policy.mounts:
        if isinstance(mount, DirMount):
            lines.append(f"- {mount.guest}: host folder '{mount.name}', "
                         f"{'writable' if mount.writable else 'read-only'}")
        else:
            lines.append(f"- {mount.guest}: {_http_mount(mount)}")
    return "\n".join(lines)


def _http_mount(mount: HttpMountSpec) -> str:
    origin = urlsplit(mount.base_url)
    words = f"remote resource '{mount.name}' (files are fetched from {origin.scheme}://{origin.netloc}"
    words += "; writing a file sends it" if mount.writable else "; read-only"
    listing = mount.listing
    if listing is None:
        return words + "; not listable: open files by name)"
    if listing.paths is not None:
        return words + f"; lists {len(listing.paths)} known paths)"
    return words + f"; folders are listed from their {listing.index})"


def tools(policy: Policy) -> str:
    """The host tools the guest may call, or ''."""
    granted = policy.tools
    lines = []
    if granted.programs:
        names = ", ".join(sorted(granted.programs))
        lines.append(f"- ubertool.programs: {names} (interactive, like pexpect)")
    if granted.browser is not None:
        lines.append(f"- ubertool.browser: a browser for {', '.join(granted.browser.origins)}")
    if granted.mcp:
        servers = ", ".join(sorted(granted.mcp))
        lines.append(f"- ubertool.mcp: tools of {servers} (ubertool.mcp.tools(NAME) lists them)")
    return "\n".join(lines)


def packages(policy: Policy, installed: list[str] | None = None) -> str:
    """What the guest can import besides the built-in packages, and what it may install: one
    sentence, or ''. `installed` (`name==version`, from the run) replaces the policy's words."""
    spec = policy.packages
    words = []
    if installed:
        words.append(f"Also importable (policy packages): {', '.join(installed)}.")
    elif spec.allow and spec.preload:
        words.append(f"Also importable (policy packages): {', '.join(spec.allow)}.")
    if spec.allow and spec.guest_install:
        words.append(f"ubertool.install(NAME) adds one of: {', '.join(spec.allow)} "
                     "(pure Python; nothing else).")
    return " ".join(words)


def limits(policy: Policy) -> str:
    lim = policy.limits
    return (f"{lim.timeout_s:g} s per call unless you pass timeout_s (at most {lim.max_timeout_s:g}); "
            f"{lim.memory_mib} MiB of memory for the session")


def about_text(policy: Policy, installed: list[str] | None = None) -> str:
    """What `ubertool.about()` prints inside the sandbox; `installed` are the run's packages."""
    host_tools = tools(policy)
    extra = packages(policy, installed)
    return (f"Python 3.15 in a WebAssembly sandbox (CPython on wasmtime).\nFolders:\n{folders(policy)}\n"
            "- /tmp: scratch, lost when the session is restored\n"
            + (f"Host tools:\n{host_tools}\n" if host_tools else "")
            + f"Limits: {limits(policy)}.\nNo network, no subprocesses, no threads. "
            f"Installed: {PACKAGES}; there is no pip.\n"
            + (f"{extra}\n" if extra else "")
            + "A cell stopped by its time limit is lost, but the state from earlier cells is "
            "restored by running them again (random numbers and the clock may differ).")


def tool_description(policy: Policy) -> str:
    """The `python` tool's description: short, and enough to use it well."""
    return (
        "Run Python 3.15 in a persistent sandbox. State is kept between calls: variables, "
        "imports and functions from one call are there in the next. The value of the last "
        "expression is shown (like a notebook cell); print() anything else. Matplotlib figures "
        "left open are returned as images.\n"
        f"Folders:\n{folders(policy)}\n"
        + (f"Host tools (import ubertool):\n{tools(policy)}\n" if tools(policy) else "")
        + "There is no network and no subprocess: nothing outside is reachable except through "
        f"these folders{' and host tools' if tools(policy) else ''}. Installed: {PACKAGES} (no pip).\n"
        + (f"{packages(policy)}\n" if packages(policy) else "")
        + f"Limits: {limits(policy)}. A call past its time limit is stopped and the earlier "
        "state is restored.\n"
        "Each result names its session; pass it back as `session` to keep working in it "
        "(over stdio the one session is kept for you). Inside, `import ubertool; "
        "ubertool.about()` says more."
    )
