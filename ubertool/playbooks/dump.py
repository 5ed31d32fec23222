"""Journal -> playbook: the session's successful cells, in order, as a replayable script.

Failed cells, and the cell that saved the playbook, are left out. Cells that only inspect (a
bare name, `df.head()`, `len(x)`, ...) are kept as comments. A parameter's literal top-level assignment (`region = "EMEA"`) is taken
out of the cells, so the `# %% parameters` section, which a person can override, decides it.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubertool.playbooks.format import FORMAT, Draft, PlaybookError, check_parameter, read_playbook, render
from ubertool.runtime.journal import JournalCell, encode_exchanges
from ubertool.tools.files import open_private
from ubertool.tools.recorder import Exchange

_KEPT = frozenset({"ok", "output_truncated"})
# Looking at data; print() is left out on purpose: what a cell prints is what a replay shows.
_INSPECT_CALLS = frozenset({"len", "type", "dir", "help", "repr", "sorted", "list", "vars",
                            "head", "tail", "describe", "info", "keys", "values", "items", "about"})
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _inspects_only(code: str) -> bool:
    try:
        body = ast.parse(code).body
    except SyntaxError:
        return False

    def looks(node: ast.expr) -> bool:
        if isinstance(node, ast.Name | ast.Constant | ast.Attribute | ast.Subscript):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            return name in _INSPECT_CALLS
        return isinstance(node, ast.Tuple) and all(looks(e) for e in node.elts)

    return bool(body) and all(isinstance(s, ast.Expr) and looks(s.value) for s in body)


def _saves_a_playbook(code: str) -> bool:
    """Whether the cell calls save_playbook: dumping is about the session, not part of it."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Call) and "save_playbook" in (getattr(node.func, "attr", None),
                                                                 getattr(node.func, "id", None))
               for node in ast.walk(tree))


def _without_parameters(code: str, names: set[str]) -> str:
    """`code` minus its top-level `name = <literal>` lines for parameter names. Lines are split
    as Python splits them (only \\n, \\r\\n and \\r end one), and the result must parse to the
    same statements minus the dropped ones.

    Raises:
        PlaybookError: the cell does not come apart cleanly (keep it by not naming the parameter).
    """
    code = code.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.split("\n")
    drop: set[int] = set()
    kept = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in names and node.end_lineno is not None
                and _is_literal(node.value)):
            drop.update(range(node.lineno - 1, node.end_lineno))
        else:
            kept.append(node)
    if not drop:
        return code
    result = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    try:
        same = ast.dump(ast.parse(result)) == ast.dump(ast.Module(body=kept, type_ignores=[]))
    except SyntaxError:
        same = False
    if not same:
        raise PlaybookError(f"a cell assigning the parameter(s) {', '.join(sorted(names))} does not come apart "
                            "line by line (a statement shares a line with it); put the assignment on a "
                            "line of its own")
    return result


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def dump(cells: Sequence[JournalCell], *, name: str, description: str, params: dict[str, Any],
         source: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The playbook text and its recording, from a run's journaled cells.

    `source` carries the header facts: run, session, policy (path or None) and its sha256,
    mounts and credentials (names only), packages (`name==version`), and the ubertool executable.

    Every text the guest supplied (description, parameter names and values) is written so that
    it cannot run outside the sandbox (see `format`).

    Raises:
        PlaybookError: a bad name, parameter name or value, a cell that would not read back, or
            no successful cell to keep.
    """
    if not (isinstance(name, str) and isinstance(description, str) and isinstance(params, dict)):
        raise PlaybookError("save_playbook(name, description, params): name and description are text, "
                            "params a dict of name -> value")
    if not NAME.match(name):
        raise PlaybookError(f"playbook name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    for param, value in params.items():
        check_parameter(param, value)
    recording_name = f"{name}.recording.json"
    header = {"format": FORMAT, "name": name, "params": sorted(params), "recording": recording_name,
              "dumped": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **source}
    draft = Draft(name, description, header, dict(params))
    recorded: list[dict[str, Any]] = []
    # Reads made by cells left out: a later cell may have been answered from them (a read is
    # sent once per run), so the recording carries them to the next cell kept.
    carried: list[Exchange] = []
    for cell in cells:
        code = _without_parameters(cell.code, set(params))
        if cell.status not in _KEPT or _saves_a_playbook(cell.code) or not code.strip():
            carried += [e for e in cell.exchanges if e.reusable]
            continue
        if _inspects_only(cell.code):
            draft.comments.append((cell.number, "it only inspects", cell.code))
            carried += [e for e in cell.exchanges if e.reusable]
            continue
        draft.cells.append((cell.number, code))
        recorded.append({"number": cell.number, "stdout": cell.stdout, "value": cell.value,
                         "exchanges": json.loads(encode_exchanges([*carried, *cell.exchanges]))})
        carried = []
    if not draft.cells:
        raise PlaybookError("the session has no successful cell to keep")
    draft.docs = _docs(source, params)
    return render(draft), {"format": FORMAT, "playbook": name, "cells": recorded}


def _docs(source: dict[str, Any], params: dict[str, Any]) -> list[str]:
    policy = source.get("policy") or "<embedded default policy>"
    lines = [f"Source: run {source.get('run')}",
             f"Policy: {policy} (sha256:{source.get('policy_sha256', '')[:16]})",
             f"Mounts: {', '.join(source.get('mounts', [])) or 'none'}",
             f"Credentials: {', '.join(source.get('credentials', [])) or 'none'}",
             f"Packages: {', '.join(source.get('packages', [])) or 'none'}",
             f"Parameters: {', '.join(f'{k} (default {v!r})' for k, v in params.items()) or 'none'}"]
    return lines


def write_playbook(path: Path, text: str, recording: dict[str, Any], *, run: str | None = None,
                   mode: int = 0o700) -> Path:
    """Write the playbook (executable, with `mode`: owner-only by default) and its recording
    (`mode` without x) beside it; returns the playbook path. Each file appears whole or not at all.

    With `run`, an existing playbook at `path` is replaced only when that same run made it: a
    session never replaces another session's playbook (two sessions saving one name at once:
    one wins, the other is refused).

    Raises:
        PlaybookError: `path` holds another run's playbook (or a file that is no playbook).
        OSError: the folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    recording_path = path.with_name(f"{recording['playbook']}.recording.json")
    playbook_tmp = _written(path, text, mode)
    try:
        if run is None:
            playbook_tmp.replace(path)
        else:
            _place_for(run, playbook_tmp, path)
        _written(recording_path, json.dumps(recording, indent=1), mode & 0o666).replace(recording_path)
    finally:
        playbook_tmp.unlink(missing_ok=True)
    return path


def _written(path: Path, text: str, mode: int) -> Path:
    """`text` in a new temporary file beside `path`, with exactly `mode` whatever the umask."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with open(open_private(tmp, os.O_WRONLY | os.O_EXCL, mode), "w", encoding="utf-8") as file:
        file.write(text)
    return tmp


def _place_for(run: str, tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`: a new name atomically (a link fails if another got there first); an
    existing one only when `run` made it."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        pass
    try:
        owner = read_playbook(path).header.get("run")
    except PlaybookError:
        owner = None
    if owner != run:
        raise PlaybookError(f"a playbook named {path.stem!r} exists already ({path}), saved by "
                            f"{'run ' + str(owner) if owner else 'something else'}; choose another name")
    tmp.replace(path)
