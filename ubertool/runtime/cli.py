"""The `ubertool` command.

Exit codes: 0 done; 1 a cell failed; 2 a usage or policy error.
"""

from __future__ import annotations

import gc
import importlib.util
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
from ubertool.runtime.journal import Journal, journal_store
from ubertool.runtime.persist import SessionStore, prune_saved
from ubertool.runtime.policy import (
    DEFAULT_POLICY_NAME,
    Policy,
    PolicyError,
    load_policy,
    policy_document,
    policy_or_default,
    policy_warnings,
)
from ubertool.runtime.render import render
from ubertool.runtime.runs import open_run
from ubertool.runtime.stores import JournalError
from ubertool.runtime.telemetry import telemetry
from ubertool.runtime.warmup import warm_with_progress
from ubertool.sandbox import SandboxStartError, warm_beside

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
    """A sandbox that cannot start exits 2, saying what to try; so does a journal that cannot
    be opened (the message names `journal.url` or the file, never a password)."""
    try:
        yield
    except SandboxStartError as exc:
        click.echo(f"ubertool: {exc}\nTry `ubertool warm` to rebuild the sandbox cache.", err=True)
        sys.exit(2)
    except JournalError as exc:
        click.echo(f"ubertool: {exc}", err=True)
        sys.exit(2)


def _sandboxed(fn: Callable[..., Any], *args: Any, policy: Policy | None = None) -> Any:
    """Run `fn` after the one-time compile (with progress when it is not cached yet), with
    `policy`'s telemetry (spans and metrics exported when it names a collector)."""
    with _sandbox_errors():
        anyio.run(warm_with_progress)
        if policy is None:
            return fn(*args)
        with telemetry(policy):
            return fn(*args)


def _exit(code: int) -> None:
    """Exit with `code`, the run over: what is still alive is not collected piece by piece at
    the interpreter's end (its final collections walk every object: a few tenths of a second
    after a run); it is freed with the process. `atexit` handlers run as always."""
    gc.freeze()
    sys.exit(code)


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

    Prints what the code printed (with -c, and the value of a last expression, as the shell
    does). Exit codes: 0 it ran to its end, 1 it failed, 2 a usage or policy error.
    """
    if (code is None) == (file is None):
        raise click.UsageError("give exactly one of -c CODE or FILE")
    source = code if code is not None else file.read()
    policy = _policy(policy_path)

    async def go() -> bool:
        with Journal.default(policy.journal) as journal:
            async with open_run(policy, workspace=workspace, journal=journal) as r:
                result = await r.cell(source, timeout_s=timeout_s, echo=code is not None)
        render(result, sys.stdout, sys.stderr, show_value=code is not None)
        return result.failed

    sys.exit(1 if _sandboxed(anyio.run, go, policy=policy) else 0)


@main.command()
@policy_option
@workspace_option
def shell(policy_path: str | None, workspace: Path | None) -> None:
    """An interactive Python prompt inside one sandbox session."""
    from ubertool.runtime.shell import shell as repl

    policy = _policy(policy_path)
    _sandboxed(repl, policy, workspace, policy=policy)


@main.command()
@policy_option
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP only: the address to bind.")
@click.option("--port", type=int, default=8765, show_default=True, help="HTTP only.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="HTTP only: a Host header value to accept besides the bound address and loopback "
                   "names (a glob such as *.example.com works). Repeatable.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="HTTP only: a browser Origin to accept, e.g. https://app.example.com. Repeatable.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="HTTP only: require this bearer "
              "token (the file's text) on every request.")
@click.option("--token-env", metavar="VAR", help="HTTP only: require the bearer token in $VAR.")
@click.option("--insecure-no-auth", is_flag=True,
              help="HTTP only: serve a non-loopback address without authentication.")
@click.option("--cluster", "cluster_address", metavar="ADDRESS",
              help="Run each session as a Ray actor on this cluster (HOST:PORT of `ray start --head`, or "
                   "`auto`: the local Ray, started if none runs). Needs the [cluster] extra.")
@click.option("--warm-pool", type=click.IntRange(min=0, max=64), default=2, show_default=True,
              help="With --cluster: started sessions kept ready on each node.")
def serve(policy_path: str | None, transport: str, host: str, port: int, allow_hosts: tuple[str, ...],
          allow_origins: tuple[str, ...], token_file: str | None, token_env: str | None,
          insecure_no_auth: bool, cluster_address: str | None, warm_pool: int) -> None:
    """Serve the one `python` tool over MCP (stdio, or streamable HTTP at /mcp).

    Over HTTP every request's Host and Origin are checked and, with a token or a [server.oauth]
    policy section, its bearer token. SIGINT or SIGTERM stops the server cleanly (exit 0).
    With --cluster, sessions live on a Ray cluster and outlive this server.
    """
    warm_beside()  # the module load and self-tests go on while the server's modules import
    from ubertool.runtime.cluster import Cluster
    from ubertool.runtime.frontdoor import FrontDoor, FrontDoorError
    from ubertool.runtime.policy import ServerToken
    from ubertool.runtime.server import serve as serve_mcp

    if token_file and token_env:
        raise click.UsageError("give one of --token-file and --token-env")
    policy = _policy(policy_path)
    try:
        token = (ServerToken(file=str(Path(token_file).resolve())) if token_file
                 else ServerToken(env=token_env) if token_env else None)
    except ValueError:
        raise click.UsageError(f"--token-env: {token_env!r} is not an environment variable name") from None
    door = None
    if transport == "http":
        try:
            door = FrontDoor.of(policy, host=host, port=port, allow_hosts=allow_hosts,
                                allow_origins=allow_origins, token=token, insecure_no_auth=insecure_no_auth)
        except FrontDoorError as exc:
            click.echo(f"ubertool serve: {exc}", err=True)
            sys.exit(2)
        click.echo(f"ubertool serving MCP at http://{host}:{port}/mcp (policy: {policy.source}; "
                   f"authentication: {door.kind})", err=True)
    cluster = None
    if cluster_address:
        if importlib.util.find_spec("ray") is None:
            raise click.UsageError("--cluster needs Ray: pip install 'ubertool[cluster]'")
        cluster = Cluster(cluster_address, warm=warm_pool)
    _sandboxed(anyio.run, partial(serve_mcp, policy, transport, host=host, port=port, door=door,
                                  cluster=cluster), policy=policy)


@main.command()
@click.argument("playbook", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="The policy to replay under. Default: the one the playbook names in its header "
                   "(the embedded default policy if it names none).")
@workspace_option
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Override a parameter (VALUE is read as a Python literal when it is one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, for machines.")
@click.option("--check", is_flag=True, help="Compare each cell's output with the dumped session's (exit 3). "
              "Offline unless --live: nothing is sent, nothing is written outside.")
@click.option("--offline", is_flag=True, help="Answer mount reads and tool calls from the recording.")
@click.option("--live", is_flag=True, help="With --check: send requests and tool calls for real "
              "(writes happen again).")
def replay(playbook: Path, policy_path: str | None, workspace: Path | None, params: tuple[str, ...],
           as_json: bool, check: bool, offline: bool, live: bool) -> None:
    """Replay a PLAYBOOK in the sandbox, under its policy.

    Exit codes: 0 done, 1 a cell failed, 2 usage or policy error, 3 --check found a difference.
    """
    warm_beside()  # the module load and self-tests go on while the replay's modules import
    from ubertool.playbooks.format import PlaybookError, read_playbook
    from ubertool.playbooks.replay import (
        USAGE,
        ReplayUsageError,
        parse_overrides,
        preflight,
        resolve_policy_path,
    )
    from ubertool.playbooks.replay import replay as run_playbook

    if live and (offline or not check):
        raise click.UsageError("--live goes with --check (and not with --offline)")
    offline = offline or (check and not live)
    try:
        book = read_playbook(playbook)
        policy = _policy(resolve_policy_path(book, policy_path))
        overrides = parse_overrides(list(params), book)
        for warning in preflight(book, policy, offline=offline):
            click.echo(warning, err=True)
    except (PlaybookError, ReplayUsageError) as exc:
        click.echo(f"ubertool replay: {exc}", err=True)
        sys.exit(USAGE)
    if check and overrides:
        click.echo("note: --check compares with the session as dumped, with its default parameters; "
                   f"-p {' '.join(params)} may change what the cells print", err=True)
    if check and live:
        click.echo("note: --check --live sends requests and tool calls again: writes happen again", err=True)

    async def go() -> Any:
        with Journal.default(policy.journal) as journal:
            return await run_playbook(book, policy, overrides, check=check, offline=offline,
                                      as_json=as_json, journal=journal, workspace=workspace)

    try:
        outcome = _sandboxed(anyio.run, go, policy=policy)
    except ReplayUsageError as exc:
        click.echo(f"ubertool replay: {exc}", err=True)
        sys.exit(USAGE)
    if as_json:
        click.echo(json.dumps({"playbook": str(playbook), "exit_code": outcome.exit_code,
                               "failed_cell": outcome.failed_cell, "failed": outcome.failed,
                               "differences": outcome.differences, "cells": outcome.cells}, indent=1))
    _exit(outcome.exit_code)


@main.group()
def sessions() -> None:
    """List journaled sessions, or dump one as a playbook."""


journal_policy_option = click.option(
    "--policy", "policy_path", type=click.Path(dir_okay=False),
    help="The policy whose [journal] to use (its url: PostgreSQL). Default: the local SQLite journal.")


@sessions.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@journal_policy_option
def sessions_list(limit: int, policy_path: str | None) -> None:
    """The latest runs in the journal, newest first."""
    with _sandbox_errors(), _journal_of(policy_path) as journal:
        runs = journal.runs(limit)
    if not runs:
        click.echo("No sessions in the journal yet.")
        return
    click.echo(f"{'RUN':<26} {'KIND':<7} {'STARTED':<26} {'CELLS':>5}  SESSION")
    for r in runs:
        click.echo(f"{r.id:<26} {r.kind:<7} {r.started:<26} {r.cells:>5}  {r.session or '-'}")


def _journal_of(policy_path: str | None) -> Journal:
    """The journal the policy names (unopened; not pruned on opening)."""
    return Journal(journal_store(_policy(policy_path).journal))


def _days(text: str) -> float:
    """'30d', '12h', '90m' or a number of days, as seconds."""
    units = {"d": 86_400, "h": 3_600, "m": 60}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text) * 86_400
    except ValueError:
        raise click.BadParameter(f"{text!r}: write it as 30d, 12h or 90m") from None


@sessions.command("prune")
@click.option("--older-than", metavar="AGE", help="Remove ended runs started longer ago than AGE (30d, 12h, "
              "90m). Default: the policy's journal.keep_days.")
@click.option("--max-mib", type=click.IntRange(min=1), help="Then remove the oldest ended runs until the "
              "journal holds at most this much. Default: the policy's journal.max_mib.")
@policy_option
def sessions_prune(older_than: str | None, max_mib: int | None, policy_path: str | None) -> None:
    """Remove old runs from the journal, the bodies no other run refers to, and the saved
    sessions of the runs removed (or saved longer ago than AGE).

    Runs still going are kept; playbooks and their recordings are never touched.
    """
    policy = _policy(policy_path)
    retention = policy.journal
    older_than_s = _days(older_than) if older_than else retention.keep_days * 86_400
    max_bytes = (max_mib or retention.max_mib) * 2**20
    with _sandbox_errors(), _journal_of(policy_path) as journal:
        pruned = journal.prune(older_than_s=older_than_s, max_bytes=max_bytes)
        saved = prune_saved(SessionStore.default(journal), journal, older_than_s, policy.workspace.keep)
    click.echo(f"Removed {len(pruned.runs)} runs and {pruned.bodies} bodies, and {saved} saved sessions; "
               f"the journal holds {pruned.held_bytes / 2**20:.1f} MiB.")


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
@journal_policy_option
def sessions_dump(ref: str, output: Path, name: str | None, description: str,
                  params: tuple[str, ...], mode: str, policy_path: str | None) -> None:
    """Write the session REF (a run id, a prefix of one, or a session handle) as a playbook."""
    from ubertool.playbooks.dump import dump, write_playbook
    from ubertool.playbooks.format import PlaybookError, parse_assignments
    from ubertool.runtime.runs import RunRecord, cached_packages, source_facts

    try:
        defaults = parse_assignments(params)
    except PlaybookError as exc:
        raise click.UsageError(str(exc)) from None
    with _sandbox_errors(), _journal_of(policy_path) as journal:
        found = journal.find_run(ref)
        if found is None:
            click.echo(f"ubertool: no single session matches {ref!r}; `ubertool sessions list` lists them",
                       err=True)
            sys.exit(2)
        cells = journal.cells(found.id)
    policy = _policy(None if found.policy_source == DEFAULT_POLICY_NAME else found.policy_source)
    source = source_facts(RunRecord(found.id, found.kind, policy, cells, found.session,
                                    packages=cached_packages(policy)))
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
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help="The policy file (or give it "
              "as FILE).")
def check(file: str | None, policy_path: str | None) -> None:
    """Validate FILE; print each problem with its key path (exit 2), and warnings (on stderr, exit 0)."""
    if (file is None) == (policy_path is None):
        raise click.UsageError("give the policy file once: `ubertool policy check FILE` or --policy FILE")
    file = file or policy_path
    assert file is not None
    try:
        checked = load_policy(file)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    for warning in policy_warnings(checked):
        click.echo(f"{file}: warning: {warning}", err=True)
    problems = _package_problems(checked)
    for problem in problems:
        click.echo(f"{file}: {problem}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{file}: ok")


def _package_problems(checked: Policy) -> list[str]:
    """The policy's packages resolved (fetched unless cached): one line per problem."""
    from ubertool.tools.files import cache_home
    from ubertool.tools.packages import PackageCache, PackageError, cache_folder_of

    if not checked.packages.allow:
        return []
    cache = PackageCache(cache_folder_of(cache_home()), checked.packages)
    try:
        cache.resolve(list(checked.packages.allowed().values()))
    except PackageError as exc:
        return [f"packages.allow: {exc}"]
    return []


@policy.command()
@policy_option
def show(policy_path: str | None) -> None:
    """Print the effective policy, every default filled in."""
    effective = _policy(policy_path)
    click.echo(f"# effective policy from {effective.source}")
    click.echo(tomli_w.dumps(policy_document(effective)), nl=False)


@main.group()
def packages() -> None:
    """The pure-Python packages the policy's [packages] section allows."""


def _package_cache(policy_path: str | None, *, offline: bool = False) -> tuple[Policy, Any]:
    from ubertool.tools.files import cache_home
    from ubertool.tools.packages import PackageCache, cache_folder_of

    def progress(kind: str, **fields: Any) -> None:
        if kind == "package_fetch":
            click.echo(f"fetching {fields['requirement']}", err=True)

    chosen = _policy(policy_path)
    return chosen, PackageCache(cache_folder_of(cache_home()), chosen.packages, offline=offline,
                                on_event=progress)


@packages.command("list")
@policy_option
def packages_list(policy_path: str | None) -> None:
    """What the policy allows and the exact versions in the cache (nothing is fetched)."""
    from ubertool.tools.packages import builtin_packages

    chosen, cache = _package_cache(policy_path, offline=True)
    spec = chosen.packages
    if not spec.allow:
        click.echo(f"The policy {chosen.source} allows no packages ([packages] allow = [...]).")
        return
    modes = [w for w, on in (("preloaded", spec.preload), ("guest may install", spec.guest_install)) if on]
    mode = ", ".join(modes) or "not importable: preload and guest_install are off"
    click.echo(f"Allowed ({mode}): {', '.join(spec.allow)}")
    for name, requirement in spec.allowed().items():
        if name in builtin_packages():
            shown, version = builtin_packages()[name]
            click.echo(f"  {requirement}: built into the sandbox ({shown} {version}); nothing to fetch")
    resolved = cache.cached(list(spec.allowed().values()))
    if resolved is None:
        click.echo("Not in the cache yet: `ubertool packages sync` fetches them.")
        return
    for pin in resolved:
        click.echo(f"  {pin.exact}  {pin.filename}  sha256:{pin.sha256[:16]}")


@packages.command("sync")
@policy_option
def packages_sync(policy_path: str | None) -> None:
    """Resolve the allowed packages again and fetch what the cache lacks (then runs need no index)."""
    from ubertool.tools.packages import PackageError

    chosen, cache = _package_cache(policy_path)
    try:
        resolved = cache.resolve(list(chosen.packages.allowed().values()), refresh=True)
    except PackageError as exc:
        click.echo(f"ubertool packages sync: {exc}", err=True)
        sys.exit(2)
    for pin in resolved:
        click.echo(f"  {pin.exact}  {pin.filename}")
    click.echo(f"{len(resolved)} packages in the cache for {chosen.source}.")
