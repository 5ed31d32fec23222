"""Words for the model: the tool's description and the guest's `ubertool.about()`, from the policy."""

from __future__ import annotations

from ubertool.runtime.policy import Policy

PACKAGES = "numpy, pandas, scipy, scikit-learn, statsmodels, matplotlib, lxml"


def folders(policy: Policy) -> str:
    lines = [f"- {policy.workspace.guest_path}: writable, this session's own files"]
    lines += [f"- {grant.guest}: read-only" for grant in policy.grants]
    return "\n".join(lines)


def limits(policy: Policy) -> str:
    lim = policy.limits
    return (f"{lim.timeout_s:g} s per call unless you pass timeout_s (at most {lim.max_timeout_s:g}); "
            f"{lim.memory_mib} MiB of memory for the session")


def about_text(policy: Policy) -> str:
    """What `ubertool.about()` prints inside the sandbox."""
    return (f"Python 3.15 in a WebAssembly sandbox (CPython on wasmtime).\nFolders:\n{folders(policy)}\n"
            "- /tmp: scratch, lost when the session is restored\n"
            f"Limits: {limits(policy)}.\nNo network, no subprocesses, no threads. "
            f"Installed: {PACKAGES}; there is no pip.\n"
            "A cell stopped by its time limit is lost, but the state from earlier cells is "
            "restored by running them again (random numbers and the clock may differ).")


def tool_description(policy: Policy) -> str:
    """The `python` tool's description: short, and enough to use it well."""
    return (
        "Run Python 3.15 in a persistent sandbox. State is kept between calls: variables, "
        "imports and functions from one call are there in the next. The value of the last "
        "expression is shown (like a notebook cell); print() anything else. Matplotlib figures "
        "left open are returned as images.\n"
        f"Folders:\n{folders(policy)}\n"
        "There is no network and no subprocess: nothing outside is reachable except through "
        f"these folders. Installed: {PACKAGES} (no pip).\n"
        f"Limits: {limits(policy)}. A call past its time limit is stopped and the earlier "
        "state is restored.\n"
        "Each result names its session; pass it back as `session` to keep working in it "
        "(over stdio the one session is kept for you). Inside, `import ubertool; "
        "ubertool.about()` says more."
    )
