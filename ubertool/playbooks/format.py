"""The playbook file: plain, readable Python in cells, with a header ubertool reads.

```
#!/usr/bin/env python3
# ubertool playbook: ...
\"\"\"NAME: DESCRIPTION ... (for people)\"\"\"
# ubertool-playbook: {"format": 1, ...}        (for ubertool)

if __name__ == "__main__": ...                   (run directly: hand the file to ubertool)

# %% parameters
region = 'EMEA'

# %% cell 3
...
```

Only the `# %% parameters` and `# %% cell N` sections run, each as one cell in the sandbox;
a section whose marker says `(not replayed)` is kept for reading only. Beside the file,
`NAME.recording.json` holds what each cell printed and the outside exchanges it caused
(for `--check` and `--offline`).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
_HEADER = re.compile(r"^# ubertool-playbook: (\{.*\})\s*$", re.M)
_MARKER = re.compile(r"^# %% (parameters|cell (\d+))(.*)$")


class PlaybookError(ValueError):
    """A playbook that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Section:
    """A runnable part of a playbook: the parameters (number 0) or one cell of the session."""

    number: int
    code: str
    line: int  # where its code starts in the file, for error messages


@dataclass(frozen=True)
class Playbook:
    path: Path
    header: dict[str, Any]
    parameters: dict[str, Any]
    cells: tuple[Section, ...]

    @property
    def name(self) -> str:
        return str(self.header.get("name", self.path.stem))

    @property
    def recording_path(self) -> Path:
        return self.path.with_name(str(self.header.get("recording") or f"{self.path.stem}.recording.json"))

    def policy_path(self) -> Path | None:
        """The policy it was made under, resolved against the playbook's folder; None: embedded."""
        policy = self.header.get("policy")
        if not policy:
            return None
        path = Path(policy).expanduser()
        return path if path.is_absolute() else (self.path.parent / path)


def parse_assignments(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`NAME=VALUE` pairs as given on a command line: VALUE is read as a Python literal when it
    is one (`3`, `'EMEA'`, `[1, 2]`), else as text.

    Raises:
        PlaybookError: a pair without `=`.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise PlaybookError(f"-p {pair!r}: write it as NAME=VALUE")
        try:
            values[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[name] = raw
    return values


def parameters_code(values: dict[str, Any]) -> str:
    return "".join(f"{name} = {value!r}\n" for name, value in values.items())


def _parse_parameters(code: str, where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for node in ast.parse(code).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise PlaybookError(f"{where}: the parameters section holds only `name = value` lines")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise PlaybookError(f"{where}: parameter {node.targets[0].id} is not a literal value") from None
    return values


def read_playbook(path: Path) -> Playbook:
    """Parse a playbook file; every section must be valid Python.

    Raises:
        PlaybookError: unreadable, no ubertool header, or a syntax error (with its line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlaybookError(f"{path}: cannot read the playbook: {exc.strerror or exc}") from None
    found = _HEADER.search(text)
    if found is None:
        raise PlaybookError(f"{path}: not an ubertool playbook (no '# ubertool-playbook:' header line)")
    try:
        header = json.loads(found.group(1))
    except ValueError:
        raise PlaybookError(f"{path}: the '# ubertool-playbook:' header is not valid JSON") from None
    sections: list[tuple[int, bool, int, list[str]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        marker = _MARKER.match(line)
        if marker:
            number = int(marker.group(2)) if marker.group(2) else 0
            sections.append((number, "not replayed" not in marker.group(3), lineno + 1, []))
        elif sections:
            sections[-1][3].append(line)
    cells, parameters = [], {}
    for number, runs, line, lines in sections:
        code = "\n".join(lines).strip("\n") + "\n"
        try:
            ast.parse(code)
        except SyntaxError as exc:
            what = "the parameters" if number == 0 else f"cell {number}"
            raise PlaybookError(f"{path}:{line + (exc.lineno or 1) - 1}: syntax error in {what}: "
                                f"{exc.msg}") from None
        if number == 0:
            parameters = _parse_parameters(code, f"{path}:{line}")
        elif runs:
            cells.append(Section(number, code, line))
    return Playbook(path, header, parameters, tuple(cells))


@dataclass
class Draft:
    """A playbook being written: what `dump` chose, before it becomes text."""

    name: str
    description: str
    header: dict[str, Any]
    parameters: dict[str, Any]
    cells: list[tuple[int, str]] = field(default_factory=list)  # (number, code) replayed
    comments: list[tuple[int, str, str]] = field(default_factory=list)  # (number, why, code)
    docs: list[str] = field(default_factory=list)  # lines for the docstring


def render(draft: Draft) -> str:
    """The playbook's text."""
    doc = "\n".join([f"{draft.name}: {draft.description or 'a replayable ubertool session'}", "",
                     *draft.docs])
    ubertool = draft.header.get("ubertool", "ubertool")
    parts = [
        "#!/usr/bin/env python3\n",
        "# ubertool playbook: `ubertool replay THIS_FILE [-p NAME=VALUE ...]`, or run it directly.\n",
        f'"""{doc}\n"""\n',
        f"# ubertool-playbook: {json.dumps(draft.header, sort_keys=True)}\n\n",
        "if __name__ == \"__main__\":  # run directly: ubertool runs this file in the sandbox\n"
        "    import os, shutil, sys  # noqa: E401\n\n"
        f"    _ubertool = shutil.which(\"ubertool\") or {ubertool!r}\n"
        "    os.execv(_ubertool, [_ubertool, \"replay\", __file__, *sys.argv[1:]])\n",
        "\n# %% parameters\n" + parameters_code(draft.parameters),
    ]
    blocks = [(n, f"# %% cell {n}\n{code.rstrip()}\n") for n, code in draft.cells]
    blocks += [(n, f"# %% cell {n} (not replayed: {why})\n"
                   + "".join(f"# {line}\n".replace("# \n", "#\n") for line in code.rstrip().splitlines()))
               for n, why, code in draft.comments]
    parts += ["\n" + block for _, block in sorted(blocks)]
    return "".join(parts)
