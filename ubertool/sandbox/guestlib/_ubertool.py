"""ubertool's guest runtime: it runs inside the sandbox, never on the host.

The host installs it once per interpreter (`install`) and then sends every cell as one call of
`run_cell`. A cell's output is captured by two permanent streams that keep the head and the
tail of what was written (so a `logging` handler bound in one cell still works in the next),
and its outcome is written to the real standard output as one JSON record after `MARK`. The
host reads that record; anything the guest writes around the streams (`os.write(1, ...)`) is
kept as plain output.
"""

import ast
import builtins
import io
import json
import linecache
import sys

MARK = "\x1eubertool-result\x1e"
_THIS_FILE = __file__


class _HeadTail(io.TextIOBase):
    """A text stream keeping the first and the last bytes written to it, up to `cap` in all."""

    def __init__(self, name: str, cap: int) -> None:
        self.name = f"<{name}>"
        self._cap = cap
        self.reset()

    def reset(self) -> None:
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        self._total += len(data)
        room = self._cap // 2 - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            keep = self._cap - self._cap // 2
            if len(self._tail) > 2 * keep:  # trim rarely, so a flood stays linear
                del self._tail[:-keep]
        return len(text)

    def collect(self) -> dict:
        """The kept head and tail, and how many bytes were dropped between them."""
        keep = self._cap - self._cap // 2
        tail = bytes(self._tail[-keep:]) if keep else b""
        return {
            "head": bytes(self._head).decode("utf-8", "replace"),
            "tail": tail.decode("utf-8", "replace"),
            "dropped": self._total - len(self._head) - len(tail),
        }


_streams: dict[str, _HeadTail] = {}


def install(cap: int, about: str) -> None:
    """Replace sys.stdout and sys.stderr by capturing streams of `cap` bytes each, and give
    the guest helper module `ubertool` the text of `ubertool.about()`."""
    import warnings

    _streams["stdout"] = sys.stdout = _HeadTail("stdout", cap)
    _streams["stderr"] = sys.stderr = _HeadTail("stderr", cap)
    # Figures are returned as images at the end of each cell, so show() has nothing to do.
    warnings.filterwarnings("ignore", "FigureCanvasAgg is non-interactive")
    import ubertool  # the guest helper beside this file, not the host package

    ubertool.ABOUT = about
    _install_clock()


# The session's monotonic clock. wasmtime's starts at zero with each interpreter, and a session
# gets a new interpreter after a stop (its memory copied in) or a server restart: the host
# sets `_clock_offset` after each such start (`set_clock`) so that `time.monotonic()` and its
# kin count from the session's start and never go back. Bound before any cell or template import,
# so `from time import monotonic` in a module later imported gets the session's clock too.
_clock_offset = 0
_raw_clocks: dict = {}


def _install_clock() -> None:
    import time

    if _raw_clocks:
        return
    for name in ("monotonic_ns", "perf_counter_ns"):
        _raw_clocks[name] = raw = getattr(time, name)
        setattr(time, name, _shifted_ns(raw))
    for name in ("monotonic", "perf_counter"):
        _raw_clocks[name] = raw = getattr(time, name + "_ns")
        setattr(time, name, _shifted_s(raw))


def _shifted_ns(raw):
    def clock() -> int:
        return raw() + _clock_offset
    return clock


def _shifted_s(raw):
    def clock() -> float:
        return (raw() + _clock_offset) / 1e9
    return clock


def set_clock(now_ns: int) -> None:
    """Make the session's monotonic clock read `now_ns` now: the host's count since the session
    began, read just before this turn (so this clock trails the host's by the turn's start)."""
    global _clock_offset
    _clock_offset = now_ns - _raw_clocks["monotonic_ns"]()


def reseed() -> None:
    """New random streams for an interpreter started from a template image, so that sessions
    from one template never share them: `random`, numpy's global state, tempfile's names."""
    import os
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None


def _figures() -> list[str]:
    """Every open matplotlib figure as base64 PNG, then closed (as a notebook shows them)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None or not pyplot.get_fignums():
        return []
    import base64

    images = []
    for number in pyplot.get_fignums():
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png", bbox_inches="tight")
        images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    pyplot.close("all")
    return images


def _guest_tb(tb):
    """Skip this module's own frames, so a traceback shows only the cell and what it called."""
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return tb


def _error(exc: BaseException) -> dict:
    import traceback  # about 25 ms to import in the guest: only when a cell fails

    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    # A syntax error is the cell's own text: the parser's frames say nothing to the reader.
    tb = None if isinstance(exc, SyntaxError) else _guest_tb(exc.__traceback__)
    lines = traceback.format_exception(kind, exc, tb)
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the error itself
        message = f"<unprintable {name}>"
    return {"type": name, "message": message, "traceback": "".join(lines)}


def _compile(source: str, filename: str, echo: bool):
    """The cell's body (None: nothing before the expression) and, when `echo` and it ends
    with an expression, that expression."""
    if echo and "\n" not in source.rstrip() and source[:1] not in (" ", "\t"):
        # One line that is one expression ("df.head()"): compiled once, without the syntax
        # tree (which costs twice as much in the guest); any other line fails here at once.
        try:
            return None, compile(source, filename, "eval")
        except SyntaxError:
            pass
    tree = ast.parse(source, filename, "exec")
    last = None
    if echo and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    body = compile(tree, filename, "exec")
    return body, (compile(last, filename, "eval") if last is not None else None)


def _execute(source: str, filename: str, echo: bool, value_cap: int) -> tuple[dict | None, dict | None]:
    namespace = sys.modules["__main__"].__dict__
    try:
        body, last = _compile(source, filename, echo)
        if body is not None:
            exec(body, namespace)
        value = eval(last, namespace) if last is not None else None
    except BaseException as exc:  # the cell's own failure, SystemExit and KeyboardInterrupt too
        return None, _error(exc)
    if value is None:
        return None, None
    builtins._ = value
    try:
        text = repr(value)
    except BaseException as exc:
        return None, _error(exc)
    data = text.encode("utf-8", "replace")
    if len(data) <= value_cap:
        return {"head": text, "tail": "", "dropped": 0}, None
    half = value_cap // 2
    head, tail = data[:half].decode("utf-8", "replace"), data[-half:].decode("utf-8", "replace")
    return {"head": head, "tail": tail, "dropped": len(data) - 2 * half}, None


def run_cell(number: int, source: str, echo: bool, value_cap: int) -> None:
    """Run one cell in `__main__` and write its record to the real standard output."""
    filename = f"<cell-{number}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    for stream in _streams.values():
        stream.reset()
    value, error = _execute(source, filename, echo, value_cap)
    try:
        images = _figures()
    except Exception as exc:  # a figure that cannot be drawn is the cell's error, not ours
        images, error = [], error or _error(exc)
    record = {"value": value, "error": error, "images": images}
    for name, stream in _streams.items():
        record[name] = stream.collect()
    sys.__stdout__.write(MARK + json.dumps(record, ensure_ascii=False) + "\n")
    sys.__stdout__.flush()
