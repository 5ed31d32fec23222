"""ubertool: what this sandbox is and what it can reach. Start with `ubertool.about()`.

This module lives inside the sandbox. The sandbox runs CPython on WebAssembly: there is no
network, no subprocess and no thread; the only host folders are the ones `about()` lists.
Figures left open at the end of a cell (matplotlib) are returned as images.
"""

ABOUT = "(the host did not describe this sandbox)"


def about() -> None:
    """Print the folders this sandbox sees, its limits, and how state is kept."""
    print(ABOUT)
