"""The playbook file: plain, readable Python in cells, inert outside the sandbox.

```
#!/usr/bin/env python3
# ubertool playbook: replay it with `ubertool replay THIS_FILE [-p NAME=VALUE ...]` ...
# ubertool-playbook: {"format": 2, ...}            (the header: line 3, and only there)
#
# NAME: DESCRIPTION ... (for people: comment lines only)

if __name__ == "__main__": ...                      (run directly: hand the file to ubertool)
raise ImportError(...)                              (any other way: stop before any cell)

# %% parameters
region = 'EMEA'

# %% cell 3
...
```

Host Python never runs a cell. Everything above `# %% parameters` is written by ubertool: the
guard and the `raise` are fixed text, the header is JSON on one line, and whatever the guest
supplied (description, parameter values) appears only as neutralised comment lines or `repr`'d
literals, which are read back with `ast.literal_eval` only. `read_playbook` refuses a file
whose part above the cells is not exactly that, or that has a second header line anywhere.

Only the `# %% parameters` and `# %% cell N` sections run, each as one cell in the sandbox;
a section whose marker says `(not replayed: ...)` is kept for reading only. Beside the file,
`NAME.recording.json` holds what each cell printed and the outside exchanges it caused
(for `--check` and `--offline`).
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import math
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 2
HEADER_LINE = 3  # 1-based: after the shebang and the title comment
_HEADER_PREFIX = "# ubertool-playbook:"
_HEADER = re.compile(r"^# ubertool-playbook: (\{.*\})$")
# A cell starts at any percent-format marker, as editors and Jupytext write them (`# %%`,
# `# %% title`, `# %% [markdown]`); ubertool writes `# %% parameters` and `# %% cell N`.
_MARKER = re.compile(r"^# ?%%(.*)$")
_NUMBERED = re.compile(r"^cell (\d+)(?: \((not replayed: [^()]*)\))?$")
_RECORDING = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.recording\.json$")
_TITLE = "# ubertool playbook: replay it with `ubertool replay THIS_FILE [-p NAME=VALUE ...]`, or run it directly."


class PlaybookError(ValueError):
    """A playbook that cannot be read or written; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Section:
    """A runnable cell of a playbook: `number` is the session's (`# %% cell N`), None for a
    cell an editor added (`# %%` or `# %% title`)."""

    number: int | None
    code: str
    line: int  # where its code starts in the file, for error messages
    title: str = ""

    @property
    def label(self) -> str:
        """How messages name it: 'cell 3', or 'the cell at line 40 (title)'."""
        if self.number is not None:
            return f"cell {self.number}"
        return f"the cell at line {self.line - 1}" + (f" ({self.title})" if self.title else "")


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
        """Beside the playbook: the header's file name when it is a bare one, else `STEM.recording.json`."""
        named = str(self.header.get("recording") or "")
        if not _RECORDING.match(named):
            named = f"{self.path.stem}.recording.json"
        return self.path.with_name(named)

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
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            values[name] = raw
    return values


def check_parameter(name: str, value: Any) -> None:
    """A parameter must be a plain Python name bound to a literal that `repr` writes and
    `ast.literal_eval` reads back unchanged (text, numbers, booleans, None, and lists, tuples,
    dicts and sets of those).

    Raises:
        PlaybookError: which name, and what is wrong.
    """
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise PlaybookError(f"parameter {name!r} is not a plain Python name")
    try:
        _check_literal(value)
        same = ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        same = False
    if not same:
        raise PlaybookError(f"parameter {name}: {type(value).__name__} values cannot be written as a "
                            "literal; use text, numbers, booleans, None, or lists and dicts of them")


def _check_literal(value: Any) -> None:
    if value is None or isinstance(value, bool | int | str | bytes | complex):
        return
    if isinstance(value, float):
        if not math.isfinite(value):  # repr gives `nan` / `inf`: names, not literals
            raise ValueError(value)
        return
    if isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _check_literal(item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_literal(key)
            _check_literal(item)
        return
    raise TypeError(type(value).__name__)


def parameters_code(values: dict[str, Any]) -> str:
    """The parameters section's code: one `name = repr(value)` line each (see `check_parameter`)."""
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


def comment_lines(text: str) -> list[str]:
    """`text` as Python comment lines: one per line of it, every character that is not
    printable (line breaks of any kind, control and format characters) written as an escape,
    so nothing in it can end the comment or look like another line to any reader."""
    lines = ["".join(c if c.isprintable() else ascii(c)[1:-1] for c in line) for line in text.split("\n")]
    # A line that would read as a cell marker or the header gets one more space.
    return ["# " + (" " if line.startswith(("%", _HEADER_PREFIX[2:])) else "") + line for line in lines]


def source_lines(text: str) -> list[str]:
    """`text` split into lines as Python's own reader splits a source file (universal newlines)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def guard(ubertool: str) -> str:
    """The fixed code above the cells: run directly, the file execs `ubertool replay` on itself;
    imported or run any other way, it raises before reaching a cell."""
    return (
        'if __name__ == "__main__":  # run directly: ubertool replays this file in the sandbox\n'
        "    import os\n"
        "    import shutil\n"
        "    import sys\n\n"
        f'    _ubertool = shutil.which("ubertool") or {ubertool!r}\n'
        "    if not (os.path.isfile(_ubertool) and os.access(_ubertool, os.X_OK)):\n"
        '        sys.exit("ubertool is not on PATH: activate the virtualenv it is installed in '
        '(. .venv/bin/activate), or run: PATH/TO/ubertool replay " + __file__)\n'
        '    os.execv(_ubertool, [_ubertool, "replay", __file__, *sys.argv[1:]])\n'
        'raise ImportError("an ubertool playbook: its cells run only in the sandbox, through '
        '`ubertool replay FILE`")\n'
    )


def read_playbook(path: Path) -> Playbook:
    """Read a playbook file.

    Raises:
        PlaybookError: unreadable; no header at line 3, or a second one; a part above the cells
            that is not exactly what ubertool writes; a syntax error (with its line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlaybookError(f"{path}: cannot read the playbook: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_playbook(path, text)


def parse_playbook(path: Path, text: str) -> Playbook:
    """Parse a playbook's `text` (see `read_playbook`)."""
    lines = source_lines(text)
    header = _header(path, lines)
    first = next((i for i, line in enumerate(lines) if _MARKER.match(line)), len(lines))
    _check_prologue(path, "\n".join(lines[:first]), header)
    sections: list[tuple[str, int, list[str]]] = []
    for lineno, line in enumerate(lines[first:], first + 1):
        marker = _MARKER.match(line)
        if marker:
            sections.append((marker.group(1).strip(), lineno + 1, []))
        else:
            sections[-1][2].append(line)
    cells: list[Section] = []
    parameters: dict[str, Any] | None = None
    for title, line, body in sections:
        code = "\n".join(body).strip("\n") + "\n"
        numbered = _NUMBERED.match(title)
        section = Section(int(numbered.group(1)) if numbered else None, code, line, "" if numbered else title)
        if title.startswith(("[markdown]", "[md]")) or (numbered and numbered.group(2)):
            continue  # text, or kept for reading only
        try:
            ast.parse(code)
        except SyntaxError as exc:
            what = "the parameters" if title == "parameters" else section.label
            raise PlaybookError(f"{path}:{line + (exc.lineno or 1) - 1}: syntax error in {what}: "
                                f"{exc.msg}") from None
        if title != "parameters":
            cells.append(section)
        elif parameters is None:
            parameters = _parse_parameters(code, f"{path}:{line}")
        else:
            raise PlaybookError(f"{path}:{line - 1}: a second '# %% parameters' section; keep one")
    return Playbook(path, header, parameters or {}, tuple(cells))


def _header(path: Path, lines: list[str]) -> dict[str, Any]:
    """The JSON header, read from line 3 only."""
    found = [i + 1 for i, line in enumerate(lines) if line.startswith(_HEADER_PREFIX)]
    if not found:
        raise PlaybookError(f"{path}: not an ubertool playbook (no '{_HEADER_PREFIX}' header line)")
    if found != [HEADER_LINE]:
        where = ", ".join(map(str, found))
        raise PlaybookError(f"{path}: the '{_HEADER_PREFIX}' header must be line {HEADER_LINE} and the only "
                            f"one; found at line {where}. The file was changed by hand or forged; "
                            "dump the session again")
    match = _HEADER.match(lines[HEADER_LINE - 1])
    try:
        header = json.loads(match.group(1)) if match else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise PlaybookError(f"{path}:{HEADER_LINE}: the '{_HEADER_PREFIX}' header is not a JSON object")
    if header.get("format") != FORMAT:
        raise PlaybookError(f"{path}: playbook format {header.get('format')!r}; this ubertool reads format "
                            f"{FORMAT} (an older file may run code when opened directly: dump the session "
                            "again with `ubertool sessions dump`)")
    return header


def _check_prologue(path: Path, prologue: str, header: dict[str, Any]) -> None:
    """The code above the cells must be exactly ubertool's guard: nothing else runs there."""
    expected = ast.dump(ast.parse(guard(str(header.get("ubertool", "ubertool")))))
    try:
        same = ast.dump(ast.parse(prologue)) == expected
    except SyntaxError:
        same = False
    if not same:
        raise PlaybookError(f"{path}: the code above the first cell is not what ubertool writes (only "
                            "comments and the `__main__` guard belong there); it may run on the host if "
                            "the file is run directly, so it is refused. Dump the session again")


@dataclass
class Draft:
    """A playbook being written: what `dump` chose, before it becomes text."""

    name: str
    description: str
    header: dict[str, Any]
    parameters: dict[str, Any]
    cells: list[tuple[int, str]] = field(default_factory=list)  # (number, code) replayed
    comments: list[tuple[int, str, str]] = field(default_factory=list)  # (number, why, code)
    docs: list[str] = field(default_factory=list)  # lines for the comment block


def render(draft: Draft) -> str:
    """The playbook's text, checked by reading it back.

    Raises:
        PlaybookError: a parameter that is no literal, or a cell holding a line that reads as a
            marker or header (the file would not read back as the session).
    """
    for name, value in draft.parameters.items():
        check_parameter(name, value)
    about = f"{draft.name}: {draft.description or 'a replayable ubertool session'}"
    prologue = ["#!/usr/bin/env python3", _TITLE,
                f"{_HEADER_PREFIX} {json.dumps(draft.header, sort_keys=True, ensure_ascii=True)}",
                "#", *comment_lines(about), "#", *comment_lines("\n".join(draft.docs))]
    parts = ["\n".join(prologue) + "\n\n", guard(str(draft.header.get("ubertool", "ubertool"))),
             "\n# %% parameters\n" + parameters_code(draft.parameters)]
    blocks = [(n, f"# %% cell {n}\n{_code(n, code)}") for n, code in draft.cells]
    blocks += [(n, f"# %% cell {n} (not replayed: {why})\n"
                   + "".join(f"# {line}".rstrip() + "\n" for line in source_lines(code.rstrip())))
               for n, why, code in draft.comments]
    parts += ["\n" + block for _, block in sorted(blocks)]
    text = "".join(parts)
    _check_round_trip(draft, text)
    return text


def _code(number: int, code: str) -> str:
    """A cell's code as the file holds it. A comment line that would start a cell of its own
    (`# %% ...`, as notebook users write) gets one more `#`; any other such line is refused."""
    lines = source_lines(code.rstrip())
    comments = _comment_lines("\n".join(lines))
    for index, line in enumerate(lines):
        if not (_MARKER.match(line) or line.startswith(_HEADER_PREFIX)):
            continue
        if index + 1 in comments:
            lines[index] = "#" + line
            continue
        raise PlaybookError(f"cell {number} has a line that reads as a playbook marker ({line[:60]!r}); "
                            f"change that line (text starting '# %%' or '{_HEADER_PREFIX}') and save again")
    return "\n".join(lines) + "\n"


def _comment_lines(code: str) -> set[int]:
    """The numbers of the lines that are whole-line comments."""
    try:
        return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.COMMENT and tok.start[1] == 0}
    except (tokenize.TokenError, SyntaxError):
        return set()


def _check_round_trip(draft: Draft, text: str) -> None:
    back = parse_playbook(Path(f"{draft.name}.py"), text)
    cells = [(s.number, s.code.strip("\n")) for s in back.cells]
    want = [(n, _code(n, code).strip("\n")) for n, code in sorted(draft.cells)]
    if back.header != json.loads(json.dumps(draft.header)) or back.parameters != draft.parameters \
            or cells != want:
        raise PlaybookError(f"playbook {draft.name}: the file would not read back as the session")
