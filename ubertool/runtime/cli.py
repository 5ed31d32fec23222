"""The `ubertool` command.

Exit codes: 0 done; 1 a cell failed; 2 a usage or policy error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import click
import tomli_w

from ubertool import __version__
from ubertool.runtime.policy import (
    Policy,
    PolicyError,
    load_policy,
    policy_document,
    policy_or_default,
)
from ubertool.runtime.render import render
from ubertool.runtime.runs import open_run
from ubertool.runtime.warmup import warm_with_progress
from ubertool.sandbox import SandboxStartError

POLICY_HELP = "The policy file (TOML). Default: the embedded policy (only a workspace)."


def _policy(path: str | None) -> Policy:
    try:
        return policy_or_default(path)
    except PolicyError as exc:
        click.echo(f"{exc}\nNo cell was run. Fix the policy; `ubertool policy check FILE` "
                   "checks it.", err=True)
        sys.exit(2)


def _sandboxed(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` after the one-time compile; a sandbox that cannot start exits 2."""
    try:
        anyio.run(warm_with_progress)
        return fn(*args)
    except SandboxStartError as exc:
        click.echo(f"ubertool: {exc}\nTry `ubertool warm` to rebuild the sandbox cache.", err=True)
        sys.exit(2)


policy_option = click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
                             help=POLICY_HELP)
workspace_option = click.option(
    "--workspace", type=click.Path(file_okay=False, path_type=Path),
    help="Use this host folder as /workspace (made if missing, kept afterwards). "
         "Default: a fresh folder for this run.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ubertool")
def main() -> None:
    """ubertool: run Python in a WebAssembly sandbox, under a policy."""


@main.command()
@policy_option
@workspace_option
@click.option("-c", "code", help="The code to run.")
@click.option("--timeout", "timeout_s", type=float, help="The time limit in seconds "
              "(default and cap from the policy).")
@click.argument("file", required=False, type=click.File("r", encoding="utf-8"))
def run(policy_path: str | None, workspace: Path | None, code: str | None,
        timeout_s: float | None, file: Any) -> None:
    """Run CODE or FILE (- for standard input) in a fresh sandbox session.

    Prints what the code printed; exits 0 when it ran to its end, 1 when it failed.
    """
    if (code is None) == (file is None):
        raise click.UsageError("give exactly one of -c CODE or FILE")
    source = code if code is not None else file.read()
    policy = _policy(policy_path)

    async def go() -> bool:
        async with open_run(policy, workspace=workspace) as r:
            result = await r.cell(source, timeout_s=timeout_s, echo=False)
        render(result, sys.stdout, sys.stderr, show_value=False)
        return result.failed

    sys.exit(1 if _sandboxed(anyio.run, go) else 0)


@main.command()
@policy_option
@workspace_option
def shell(policy_path: str | None, workspace: Path | None) -> None:
    """An interactive Python prompt inside one sandbox session."""
    from ubertool.runtime.shell import shell as repl

    _sandboxed(repl, _policy(policy_path), workspace)


@main.command()
@policy_option
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP only.")
@click.option("--port", type=int, default=8765, show_default=True, help="HTTP only.")
def serve(policy_path: str | None, transport: str, host: str, port: int) -> None:
    """Serve the one `python` tool over MCP (stdio, or streamable HTTP at /mcp)."""
    from ubertool.runtime.server import serve as serve_mcp

    policy = _policy(policy_path)
    if transport == "http":
        click.echo(f"ubertool serving MCP at http://{host}:{port}/mcp (policy: {policy.source})", err=True)
    _sandboxed(anyio.run, partial(serve_mcp, policy, transport, host=host, port=port))


@main.command()
def warm() -> None:
    """Compile the sandbox into the cache now (once per machine, about a minute)."""
    seconds = _sandboxed(anyio.run, warm_with_progress)
    click.echo(f"The sandbox is ready (took {seconds:.1f} s).")


@main.group()
def policy() -> None:
    """Check or show a sandbox policy."""


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> None:
    """Validate FILE; print each problem with its key path."""
    try:
        load_policy(file)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    click.echo(f"{file}: ok")


@policy.command()
@policy_option
def show(policy_path: str | None) -> None:
    """Print the effective policy, every default filled in."""
    effective = _policy(policy_path)
    click.echo(f"# effective policy from {effective.source}")
    click.echo(tomli_w.dumps(policy_document(effective)), nl=False)
