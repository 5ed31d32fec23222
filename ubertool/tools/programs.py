"""Interactive programs for the guest, driven on the host with pexpect, only as the policy allows.

Policy `[tools.programs.NAME]` fixes a program's argv; the guest may add arguments only when
`extra_args` allows them, each wholly matching `arg_pattern`. There is no shell. A child runs
in a bubblewrap jail (`ubertool.tools.jail`) that shows it its folder of the workspace and the
system folders, with a small environment (never the host's), its output and time capped; every
child is killed when the run ends. Every call is recorded (so a restore replays it without
touching the child) and audited.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pexpect
import ptyprocess
import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ubertool.tools import ToolFailure
from ubertool.tools.broker import Broker
from ubertool.tools.jail import (
    bind_problem,
    bwrap_command,
    bwrap_executable,
    bwrap_problem,
    jail_env,
    jail_folder,
    open_folder,
)
from ubertool.tools.recorder import Recorder
from ubertool.tools.redact import Redactor

_GRACE_S = 0.5  # how long close() lets a program end by itself before it is killed


# Letters, digits and `_.,:=/+-`; not starting with `-` (no options), no `..` anywhere (no
# climbing, and no `a..b` either: simpler to state than "as a path component").
DEFAULT_ARG_PATTERN = r"(?!-)(?!.*\.\.)[\w.,:=/+-]*"


class ProgramSpec(BaseModel):
    """One allowed program."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    argv: tuple[str, ...] = Field(min_length=1, strict=False)
    cwd: str = ""  # a folder inside the run's workspace (made if missing); "" is the workspace
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(10.0, gt=0, le=3600)  # the longest one expect/read waits
    lifetime_s: float = Field(600.0, gt=0, le=86_400)  # then the child is killed
    max_output_bytes: int = Field(1_048_576, ge=1024, le=64 * 2**20)  # per answer
    extra_args: int = Field(0, ge=0, le=64)  # how many arguments the guest may add
    arg_pattern: str = DEFAULT_ARG_PATTERN  # each extra argument must match it whole
    # "bwrap": the jail (ubertool.tools.jail). "none": the host as is, as the host user: only for
    # programs you would let a stranger run on your machine; `policy check` warns.
    jail: Literal["bwrap", "none"] = "bwrap"
    network: bool = False  # jailed: share the host's network (else there is none)
    ro_binds: tuple[str, ...] = Field((), strict=False)  # jailed: host paths shown read-only
    tmp_mib: int = Field(64, ge=1, le=16_384)  # jailed: the size of its /tmp and of its HOME

    @field_validator("cwd")
    @classmethod
    def _inside(cls, value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise ValueError(f"{value!r}: a folder relative to the workspace, without '..'")
        return value

    @field_validator("arg_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("ro_binds")
    @classmethod
    def _bindable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if problem := bind_problem(path):
                raise ValueError(problem)
        return value


@dataclass
class _Child:
    name: str
    process: pexpect.spawn
    started: float = field(default_factory=time.monotonic)


class _Spawn(pexpect.spawn):
    """`pexpect.spawn` that hands the child one open folder: its working folder, and bwrap's
    `--bind-fd` (pexpect itself closes every descriptor but 0-2)."""

    def __init__(self, command: str, args: list[str], *, folder_fd: int, jailed: bool,
                 **kwargs: Any) -> None:
        self._folder_fd = folder_fd
        self._jailed = jailed
        super().__init__(command, args, preexec_fn=self._in_child, **kwargs)

    def _spawnpty(self, args: list[str], **kwargs: Any) -> ptyprocess.PtyProcess:
        return ptyprocess.PtyProcess.spawn(args, pass_fds=(self._folder_fd,), **kwargs)

    def _in_child(self) -> None:  # after fork, before exec
        os.fchdir(self._folder_fd)
        os.set_inheritable(self._folder_fd, self._jailed)


def _patterns(patterns: Any) -> list[Any]:
    """The guest's `expect` patterns, compiled by RE2: matching takes time linear in the text,
    so no pattern can hold the host (Python's `re` backtracks, and cannot be interrupted).

    Raises:
        ToolFailure: not a list of text, or a pattern RE2 does not take (backreferences,
            lookaround), with RE2's words.
    """
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns) or not patterns:
        raise ToolFailure("expect takes a list of regular expressions (text)")
    options = re2.Options()
    options.log_errors = False
    try:
        return [re2.compile(pattern, options) for pattern in patterns]
    except re2.error as exc:
        raise ToolFailure(f"bad pattern ({exc}); patterns are RE2 regular expressions: no backreferences "
                          "or lookaround") from None


class ProgramBroker(Broker):
    """The run's programs; use as a context manager (leaving it kills every child)."""

    prefix = "programs"

    def __init__(self, specs: dict[str, ProgramSpec], workdir: Path, *, recorder: Recorder,
                 redactor: Redactor, on_event: Callable[..., None] | None = None) -> None:
        super().__init__(recorder=recorder, redactor=redactor, on_event=on_event)
        self._specs = specs
        self._workdir = workdir
        self._children: dict[int, _Child] = {}
        self._next = 1
        # One long-lived thread starts every child: bwrap's --die-with-parent fires when the
        # *thread* that forked it ends, and a cell's worker thread ends when it idles.
        self._starter = self._stack.enter_context(
            ThreadPoolExecutor(1, thread_name_prefix="ubertool-programs"))
        # Unjailed programs get a private HOME, never the guest's workspace.
        self._home = (self._stack.enter_context(tempfile.TemporaryDirectory(prefix="ubertool-home-"))
                      if any(spec.jail == "none" for spec in specs.values()) else "")
        self._stack.callback(self.close_all)  # closed first: children end before the above

    def close_all(self) -> None:
        with self._lock:
            children, self._children = self._children, {}
        for handle, child in children.items():
            child.process.close(force=True)
            self._on_event("program_killed", program=child.name, handle=handle, reason="run ended")

    def tools(self) -> tuple[Callable[..., Any], ...]:
        """The host functions the guest's `ubertool.programs` calls."""
        return (self.programs_spawn, self.programs_send, self.programs_expect, self.programs_read,
                self.programs_close)

    # -- the tools ---------------------------------------------------------------------------

    def programs_spawn(self, name: str, args: list[str] | None = None) -> dict[str, Any]:
        """Start an allowed program; returns its handle.

        Args:
            name: The program's name in the policy ([tools.programs.NAME]).
            args: Extra arguments, if the policy allows them.
        """
        return self._recorded("spawn", {"name": name, "args": args or []},
                              lambda: self._spawn(name, args or []))

    def programs_send(self, handle: int, text: str) -> dict[str, Any]:
        """Send text to a program's input, as typed (add a newline to end a line).

        Args:
            handle: The handle spawn returned.
            text: What to type.
        """
        return self._recorded("send", {"handle": handle, "text": text},
                              lambda: {"sent": self._child(handle).process.send(text)})

    def programs_expect(self, handle: int, patterns: list[str],
                        timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until the program's output matches one of the regular expressions.

        Args:
            handle: The handle spawn returned.
            patterns: Regular expressions; the first that matches wins.
            timeout_s: How long to wait (capped by the policy).
        """
        return self._recorded("expect", {"handle": handle, "patterns": patterns, "timeout_s": timeout_s},
                              lambda: self._expect(handle, patterns, timeout_s))

    def programs_read(self, handle: int, size: int = 65536, timeout_s: float = 0.0) -> dict[str, Any]:
        """Read what the program has printed so far, without waiting for a pattern.

        Args:
            handle: The handle spawn returned.
            size: The most characters to read.
            timeout_s: How long to wait for the first character (0: do not wait).
        """
        return self._recorded("read", {"handle": handle, "size": size, "timeout_s": timeout_s},
                              lambda: self._read(handle, size, timeout_s))

    def programs_close(self, handle: int) -> dict[str, Any]:
        """End the program (terminating it if it still runs); returns its exit status.

        Args:
            handle: The handle spawn returned.
        """
        return self._recorded("close", {"handle": handle}, lambda: self._close(handle))

    # -- the host side -----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> dict[str, Any]:
        spec = self._specs.get(name)
        if spec is None:
            allowed = ", ".join(sorted(self._specs)) or "none"
            raise ToolFailure(f"no program {name!r} in the policy (allowed: {allowed}); "
                              f"an operator adds [tools.programs.{name}] with its argv")
        if len(args) > spec.extra_args:
            raise ToolFailure(f"program {name!r} takes at most {spec.extra_args} extra arguments "
                              f"(policy tools.programs.{name}.extra_args)")
        for arg in args:
            if not isinstance(arg, str) or not re.fullmatch(spec.arg_pattern, arg):
                raise ToolFailure(f"argument {arg!r} does not match tools.programs.{name}.arg_pattern")
        if spec.jail == "bwrap" and (problem := bwrap_problem()):
            raise ToolFailure(f"program {name!r} cannot start: {problem}; or an operator sets "
                              f'tools.programs.{name}.jail = "none" to run it unjailed')
        folder_fd = self._open_folder(name, spec)
        try:
            process = self._starter.submit(self._start, spec, args, folder_fd).result()
        except pexpect.ExceptionPexpect as exc:
            raise ToolFailure(f"program {name!r} could not start: {exc}") from None
        finally:
            os.close(folder_fd)
        with self._lock:
            handle, self._next = self._next, self._next + 1
            self._children[handle] = _Child(name, process)
        self._on_event("program_spawned", program=name, handle=handle, pid=process.pid, args=args)
        return {"handle": handle, "pid": process.pid, "program": name}

    def _open_folder(self, name: str, spec: ProgramSpec) -> int:
        """The program's folder, made if missing. The guest owns the workspace: no link it made
        may lead the child out, so each step is opened without following links, and the child
        gets what was opened (a link swapped in meanwhile, by another program, changes nothing)."""
        try:
            return open_folder(self._workdir, spec.cwd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ToolFailure(f"program {name!r}: its folder {spec.cwd!r} is not a folder of the "
                                  "workspace (a link or a file is on the way)") from None
            raise ToolFailure(f"program {name!r}: its folder {spec.cwd!r} cannot be made: "
                              f"{exc.strerror}") from None

    def _start(self, spec: ProgramSpec, args: list[str], folder_fd: int) -> pexpect.spawn:
        """Start the child (on the broker's own thread), jailed unless its policy says not."""
        argv = [*spec.argv, *args]
        if spec.jail == "bwrap":
            argv = bwrap_command(bwrap_executable(), argv, folder_fd=folder_fd, folder=jail_folder(spec.cwd),
                                 env=jail_env(spec.env), network=spec.network,
                                 ro_binds=spec.ro_binds, tmp_bytes=spec.tmp_mib * 2**20)
            env: dict[str, str] = {}  # bwrap passes on only what --setenv names
        else:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self._home,
                   "LANG": "C.UTF-8", "TERM": "dumb", **spec.env}
        return _Spawn(argv[0], argv[1:], folder_fd=folder_fd, jailed=spec.jail == "bwrap", env=env,
                      encoding="utf-8", codec_errors="replace", timeout=spec.timeout_s,
                      maxread=65536, echo=False, dimensions=(24, 200))

    def _child(self, handle: int) -> _Child:
        with self._lock:
            child = self._children.get(handle)
        if child is None:
            raise ToolFailure(f"no running program with handle {handle}")
        spec = self._specs[child.name]
        if time.monotonic() - child.started > spec.lifetime_s:
            self._close(handle)
            raise ToolFailure(f"program {child.name!r} ran past its lifetime of {spec.lifetime_s:g} s "
                              "and was killed")
        return child

    def _text(self, value: Any, cap: int) -> str:
        text = value if isinstance(value, str) else ""
        return self._redactor.text(text[-cap:])

    def _expect(self, handle: int, patterns: list[str], timeout_s: float | None) -> dict[str, Any]:
        child = self._child(handle)
        spec = self._specs[child.name]
        timeout = spec.timeout_s if timeout_s is None else min(timeout_s, spec.timeout_s)
        compiled = _patterns(patterns)
        try:
            index = child.process.expect_list(compiled, timeout=timeout)
        except pexpect.TIMEOUT:
            raise ToolFailure(f"timed out after {timeout:g} s waiting for {patterns!r}; printed so far: "
                              f"{self._text(child.process.before, 2000)!r}") from None
        except pexpect.EOF:
            raise ToolFailure(f"program {child.name!r} ended before printing {patterns!r}; it printed: "
                              f"{self._text(child.process.before, 2000)!r}") from None
        cap = spec.max_output_bytes
        return {"index": index, "before": self._text(child.process.before, cap),
                "after": self._text(child.process.after, cap)}

    def _read(self, handle: int, size: int, timeout_s: float) -> dict[str, Any]:
        child = self._child(handle)
        spec = self._specs[child.name]
        try:
            text = child.process.read_nonblocking(min(size, spec.max_output_bytes),
                                                  timeout=min(timeout_s, spec.timeout_s))
        except pexpect.TIMEOUT:
            text = ""
        except pexpect.EOF:
            return {"text": "", "eof": True}
        return {"text": self._text(text, spec.max_output_bytes), "eof": False}

    def _close(self, handle: int) -> dict[str, Any]:
        with self._lock:
            child = self._children.pop(handle, None)
        if child is None:
            raise ToolFailure(f"no running program with handle {handle}")
        with contextlib.suppress(pexpect.ExceptionPexpect):
            child.process.expect(pexpect.EOF, timeout=_GRACE_S)  # a program told to quit may finish
        child.process.close(force=True)
        self._on_event("program_closed", program=child.name, handle=handle,
                       exit_status=child.process.exitstatus, signal=child.process.signalstatus)
        return {"exit_status": child.process.exitstatus, "signal": child.process.signalstatus}
