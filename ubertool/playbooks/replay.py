"""`ubertool replay`: run a playbook's cells again in the sandbox, under its policy.

Exit codes: 0 done; 1 a cell failed (which one, with its traceback); 2 a usage or policy
problem (a missing policy, a syntax error, a missing credential, an unknown parameter);
3 `--check` found a cell whose output differs from the dumped session's.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from packaging.utils import canonicalize_name

from ubertool.playbooks.format import Playbook, PlaybookError, Section, parameters_code, parse_assignments
from ubertool.runtime.journal import Journal, decode_exchanges
from ubertool.runtime.policy import Policy
from ubertool.runtime.render import render
from ubertool.runtime.runs import open_run
from ubertool.sandbox import CellError, CellResult
from ubertool.tools.packages import PackageError, parse_requirement
from ubertool.tools.recorder import Exchange

DONE, CELL_FAILED, USAGE, CHECK_FAILED = 0, 1, 2, 3


class ReplayUsageError(Exception):
    """A problem found before any cell ran (exit code 2); the message says what to do."""


def parse_overrides(pairs: list[str], playbook: Playbook) -> dict[str, Any]:
    """`NAME=VALUE` overrides (see `parse_assignments`) of the playbook's declared parameters."""
    try:
        values = parse_assignments(pairs)
    except PlaybookError as exc:
        raise ReplayUsageError(str(exc)) from None
    for name in values:
        if name not in playbook.parameters:
            known = ", ".join(playbook.parameters) or "none"
            raise ReplayUsageError(f"-p {name}: not a parameter of {playbook.name} (its parameters: {known})")
    return values


def preflight(playbook: Playbook, policy: Policy, *, offline: bool) -> list[str]:
    """Problems to stop on before running, and warnings (returned) to print."""
    used = playbook.header.get("credentials", [])
    missing = [name for name in used if name not in policy.credentials]
    if missing:
        raise ReplayUsageError(f"the policy {policy.source} has no credential {missing[0]!r}, which the "
                               "playbook uses; add it to [credentials] or pass the playbook's --policy")
    if not offline:
        for name in used:
            spec = policy.credentials[name]
            for variable in (spec.env, spec.client_secret_env, spec.subject_token_env):
                if variable and not os.environ.get(variable):
                    raise ReplayUsageError(f"credential {name!r} needs the environment variable {variable}; "
                                           "set it, or replay with --offline")
            if spec.file is not None and not spec.file.is_file():
                raise ReplayUsageError(f"credential {name!r} needs the file {spec.file}")
    pins = package_pins(playbook)
    allowed = policy.packages.allowed()
    if pins and not any(name in allowed for name in pins):
        needed = ", ".join(f"{name}=={version}" for name, version in pins.items())
        raise ReplayUsageError(f"the playbook needs packages ({needed}) that the policy {policy.source} "
                               "does not allow in [packages] allow")
    recorded = playbook.header.get("policy_sha256")
    if recorded and recorded != policy.sha256:
        return [f"note: the policy {policy.source} is not the one the playbook was made under "
                f"(sha256 {policy.sha256[:12]} vs {str(recorded)[:12]}); replaying under it anyway"]
    return []


def package_pins(playbook: Playbook) -> dict[str, str]:
    """The exact package versions the playbook's header lists (`"packages": ["name==1.0"]`), as
    name -> version. They only fix versions: what is installed is still what the policy allows.

    Raises:
        ReplayUsageError: an entry that is not `name==version`.
    """
    listed = playbook.header.get("packages", [])
    pins: dict[str, str] = {}
    for entry in listed if isinstance(listed, list) else [listed]:
        try:
            requirement = parse_requirement(entry, "packages") if isinstance(entry, str) else None
        except PackageError:
            requirement = None
        specs = list(requirement.specifier) if requirement is not None else []
        if requirement is None or requirement.extras or len(specs) != 1 or specs[0].operator != "==" \
                or "*" in specs[0].version:
            raise ReplayUsageError(f"the playbook's header lists package {entry!r:.80}, which is not "
                                   "NAME==VERSION; dump the session again")
        pins[canonicalize_name(requirement.name)] = specs[0].version
    return pins


def load_recording(playbook: Playbook) -> dict[int, dict[str, Any]]:
    path = playbook.recording_path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReplayUsageError(f"--check and --offline need the recording {path}: {exc}") from None
    return {int(cell["number"]): cell for cell in data.get("cells", [])}


@dataclass
class Outcome:
    exit_code: int = DONE
    cells: list[dict[str, Any]] = field(default_factory=list)
    failed_cell: int | None = None  # the playbook's own number (`# %% cell N`)
    failed: str | None = None  # how messages name it ("cell 9", "the parameters", ...)
    differences: list[str] = field(default_factory=list)


def _differs(section: Section, result: CellResult, expected: dict[str, Any]) -> str:
    """How the cell's output differs from the dumped session's, or ''."""
    value = None if result.value is None else str(result.value)
    for part, got, want in (("stdout", str(result.stdout), expected.get("stdout", "")),
                            ("value", value, expected.get("value"))):
        if got != want:
            return f"{section.label}: {part} differs: expected {want!r:.200}, got {got!r:.200}"
    return ""


class _Names:
    """The run's cell numbers as the playbook's own, in everything a replay prints."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def add(self, result: CellResult, name: str) -> CellResult:
        self._names[str(result.cell)] = name
        error = result.error
        if error is None:
            return result
        renamed = CellError(error.type, self._sub(error.message), self._sub(error.traceback))
        return replace(result, error=renamed)

    def _sub(self, text: str) -> str:
        return _CELL_NAME.sub(lambda m: f"<{self._names.get(m.group(1), m.group(0)[1:-1])}>", text)


_CELL_NAME = re.compile(r"<cell-(\d+)>")


async def replay(playbook: Playbook, policy: Policy, overrides: dict[str, Any], *, check: bool,
                 offline: bool, as_json: bool, journal: Journal | None, workspace: Path | None = None,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Outcome:
    """Run the playbook; print each cell's output (or, `as_json`, nothing until the end).
    Cells are named by the playbook's own numbers everywhere. With `check`, each cell's output
    is compared with the dumped session's; with `offline`, outside exchanges are answered from
    the recording. `workspace` is a host folder to use (and keep) as /workspace."""
    recording = load_recording(playbook) if check or offline else {}
    exchanges: list[Exchange] | None = None
    if offline:
        exchanges = [e for number in sorted(recording)
                     for e in decode_exchanges(json.dumps(recording[number].get("exchanges", [])))]
    params = {**playbook.parameters, **overrides}
    outcome = Outcome()
    names = _Names()
    tty = err.isatty() and not as_json
    async with open_run(policy, kind="replay", journal=journal, replay=exchanges, workspace=workspace,
                        pins=package_pins(playbook), offline=offline) as run:
        if params:
            result = names.add(await run.cell(parameters_code(params), echo=False), "parameters")
            if result.failed:
                return _fail(outcome, result, None, err, as_json)
        total = len(playbook.cells)
        for index, section in enumerate(playbook.cells, 1):
            if tty:
                err.write(f"\r[{index}/{total}] {section.label} ...")
                err.flush()
            result = names.add(await run.cell(section.code), _name(section))
            if tty:
                err.write(f"\r[{index}/{total}] {section.label}: {result.status} ({result.duration_s:.2f} s)\n")
            entry = {"number": section.number, "label": section.label, "status": str(result.status),
                     "stdout": str(result.stdout), "value": None if result.value is None else str(result.value),
                     "duration_s": round(result.duration_s, 6),
                     "error": result.error.traceback if result.error else None}
            if not as_json:
                render(result, out, err, show_value=True)
            if check and section.number in recording:
                difference = _differs(section, result, recording[section.number])
                entry["check"] = "differs" if difference else "same"
                if difference:
                    outcome.differences.append(difference)
            outcome.cells.append(entry)
            if result.failed:
                return _fail(outcome, result, section, err, as_json)
    if outcome.differences:
        outcome.exit_code = CHECK_FAILED
        if not as_json:
            err.write("check: the output differs from the dumped session's:\n"
                      + "".join(f"  {d}\n" for d in outcome.differences))
    return outcome


def _name(section: Section) -> str:
    """A cell's name in tracebacks: `<cell-9>` as in the file, or `<cell at line 40>`."""
    return f"cell-{section.number}" if section.number is not None else section.label.removeprefix("the ")


def _fail(outcome: Outcome, result: CellResult, section: Section | None, err: TextIO, as_json: bool) -> Outcome:
    outcome.exit_code = CELL_FAILED
    outcome.failed_cell = section.number if section is not None else None
    outcome.failed = section.label if section is not None else "the parameters"
    if not as_json:
        err.write(f"replay stopped: {outcome.failed} failed ({result.status})"
                  + (f": {result.message}" if result.message else "") + "\n")
    return outcome


def resolve_policy_path(playbook: Playbook, given: str | None) -> Path | None:
    """The policy file to use: --policy, else the playbook's own (None: the embedded default)."""
    if given is not None:
        return Path(given)
    path = playbook.policy_path()
    if path is not None and not path.is_file():
        raise ReplayUsageError(f"the playbook's policy {path} is missing; pass --policy FILE")
    return path
