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
