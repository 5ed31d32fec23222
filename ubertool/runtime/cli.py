"""The `ubertool` command.

Exit codes: 0 done; 1 a cell failed; 2 a usage or policy error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import click
import tomli_w

from ubertool import __version__
from ubertool.runtime.home import tighten_state_home
from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import (
    DEFAULT_POLICY_NAME,
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


def _policy(path: str | Path | None) -> Policy:
    try:
        return policy_or_default(path)
    except PolicyError as exc:
        click.echo(f"{exc}\nNo cell was run. Fix the policy; `ubertool policy check FILE` "
                   "checks it.", err=True)
        sys.exit(2)


@contextmanager
def _sandbox_errors() -> Iterator[None]:
    """A sandbox that cannot start exits 2, saying what to try."""
    try:
        yield
    except SandboxStartError as exc:
        click.echo(f"ubertool: {exc}\nTry `ubertool warm` to rebuild the sandbox cache.", err=True)
        sys.exit(2)


def _sandboxed(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` after the one-time compile (with progress when it is not cached yet)."""
    with _sandbox_errors():
        anyio.run(warm_with_progress)
        return fn(*args)


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
    # What ubertool and its guests create (journal, workspaces, files a cell writes) is
    # readable by this user only, whatever umask the shell had.
    os.umask(0o077)
    tighten_state_home(lambda line: click.echo(line, err=True))


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
        with Journal(default_journal_path()) as journal:
            async with open_run(policy, workspace=workspace, journal=journal) as r:
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
@click.argument("playbook", type=click.Path(dir_okay=False, path_type=Path))
@policy_option
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Override a parameter (VALUE is read as a Python literal when it is one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, for machines.")
@click.option("--check", is_flag=True, help="Compare each cell's output with the dumped session's (exit 3).")
@click.option("--offline", is_flag=True, help="Answer mount reads and tool calls from the recording.")
def replay(playbook: Path, policy_path: str | None, params: tuple[str, ...], as_json: bool, check: bool,
           offline: bool) -> None:
    """Replay a PLAYBOOK in the sandbox, under its policy.

    Exit codes: 0 done, 1 a cell failed, 2 usage or policy error, 3 --check found a difference.
    """
    from ubertool.playbooks.format import PlaybookError, read_playbook
    from ubertool.playbooks.replay import (
        USAGE,
        ReplayUsageError,
        parse_overrides,
        preflight,
        resolve_policy_path,
    )
    from ubertool.playbooks.replay import replay as run_playbook

    try:
        book = read_playbook(playbook)
        policy = _policy(resolve_policy_path(book, policy_path))
        overrides = parse_overrides(list(params), book)
        for warning in preflight(book, policy, offline=offline):
            click.echo(warning, err=True)
    except (PlaybookError, ReplayUsageError) as exc:
        click.echo(f"ubertool replay: {exc}", err=True)
        sys.exit(USAGE)

    async def go() -> Any:
        with Journal(default_journal_path()) as journal:
            return await run_playbook(book, policy, overrides, check=check, offline=offline,
                                      as_json=as_json, journal=journal)

    try:
        outcome = _sandboxed(anyio.run, go)
    except ReplayUsageError as exc:
        click.echo(f"ubertool replay: {exc}", err=True)
        sys.exit(USAGE)
    if as_json:
        click.echo(json.dumps({"playbook": str(playbook), "exit_code": outcome.exit_code,
                               "failed_cell": outcome.failed_cell, "differences": outcome.differences,
                               "cells": outcome.cells}, indent=1))
    sys.exit(outcome.exit_code)


@main.group()
def sessions() -> None:
    """List journaled sessions, or dump one as a playbook."""


@sessions.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
def sessions_list(limit: int) -> None:
    """The latest runs in the journal, newest first."""
    with Journal(default_journal_path()) as journal:
        runs = journal.runs(limit)
    if not runs:
        click.echo("No sessions in the journal yet.")
        return
    click.echo(f"{'RUN':<26} {'KIND':<7} {'STARTED':<26} {'CELLS':>5}  SESSION")
    for r in runs:
        click.echo(f"{r.id:<26} {r.kind:<7} {r.started:<26} {r.cells:>5}  {r.session or '-'}")


@sessions.command("dump")
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the playbook, e.g. playbooks/NAME.py.")
@click.option("--name", help="The playbook's name (default: the output file's name).")
@click.option("--description", default="", help="One line on what it does.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A parameter a person may override, with its default.")
@click.option("--mode", type=click.Choice(["700", "750", "755"]), default="700", show_default=True,
              help="The playbook's permissions (its recording gets the same without x). The default "
                   "is owner-only, since a playbook holds the session's code and its recording what "
                   "the cells printed and fetched.")
def sessions_dump(ref: str, output: Path, name: str | None, description: str,
                  params: tuple[str, ...], mode: str) -> None:
    """Write the session REF (a run id, a prefix of one, or a session handle) as a playbook."""
    from ubertool.playbooks.dump import dump, write_playbook
    from ubertool.playbooks.format import PlaybookError, parse_assignments
    from ubertool.runtime.runs import RunRecord, source_facts

    try:
        defaults = parse_assignments(params)
    except PlaybookError as exc:
        raise click.UsageError(str(exc)) from None
    with Journal(default_journal_path()) as journal:
        found = journal.find_run(ref)
        if found is None:
            click.echo(f"ubertool: no single session matches {ref!r}; `ubertool sessions list` lists them",
                       err=True)
            sys.exit(2)
        cells = journal.cells(found.id)
    policy = _policy(None if found.policy_source == DEFAULT_POLICY_NAME else found.policy_source)
    source = source_facts(RunRecord(found.id, found.kind, policy, cells, found.session))
    if policy.path is not None:  # relative to the playbook, so the two can move together
        source["policy"] = os.path.relpath(policy.path, output.resolve().parent)
    try:
        text, recording = dump(cells, name=name or output.stem, description=description, params=defaults,
                               source=source)
    except ValueError as exc:
        click.echo(f"ubertool: {exc}", err=True)
        sys.exit(2)
    path = write_playbook(output, text, recording, mode=int(mode, 8))
    click.echo(f"Wrote {path} ({len(recording['cells'])} cells). Replay it: ubertool replay {path}")


@main.command()
def warm() -> None:
    """Compile the sandbox into the cache now (once per machine, about a minute)."""
    with _sandbox_errors():
        seconds = anyio.run(warm_with_progress)
    click.echo(f"The sandbox is ready (took {seconds:.1f} s).")


@main.group()
def policy() -> None:
    """Check or show a sandbox policy."""


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> None:
    """Validate FILE; print each problem with its key path, and warnings (on stderr, exit 0)."""
    try:
        checked = load_policy(file)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    browser = checked.tools.browser
    for warning in browser.warnings() if browser is not None else ():
        click.echo(f"{file}: warning: {warning}", err=True)
    click.echo(f"{file}: ok")


@policy.command()
@policy_option
def show(policy_path: str | None) -> None:
    """Print the effective policy, every default filled in."""
    effective = _policy(policy_path)
    click.echo(f"# effective policy from {effective.source}")
    click.echo(tomli_w.dumps(policy_document(effective)), nl=False)
