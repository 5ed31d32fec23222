"""Pure-Python packages: wheels built here, served from a local folder index (no network),
fetched by the host, unpacked once into the cache and granted read-only to the guest."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import cli_env, ubertool_command

from ubertool.runtime.journal import Journal, default_journal_path
from ubertool.runtime.policy import load_policy
from ubertool.runtime.runs import open_run
from ubertool.sandbox import SandboxStartError
from ubertool.tools.packages import MAX_METADATA_BYTES, PackageError, inspect_wheel, unpack_wheel

pytestmark = pytest.mark.anyio


def wheel(index: Path, name: str, version: str, files: dict[str, str], *, tag: str = "py3-none-any",
          requires: tuple[str, ...] = (), purelib: bool = True, description: str = "") -> Path:
    """A minimal wheel in `index`, as a build backend writes one."""
    index.mkdir(exist_ok=True)
    path = index / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for member, text in files.items():
            zipped.writestr(member, text)
        zipped.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                        + "".join(f"Requires-Dist: {r}\n" for r in requires) + description)
        zipped.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                        f"Root-Is-Purelib: {'true' if purelib else 'false'}\nTag: {tag}\n")
        zipped.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "ubertool"
    monkeypatch.setenv("UBERTOOL_CACHE", str(folder))
    return folder


@pytest.fixture
def index(tmp_path: Path) -> Path:
    """alpha 1.0 (needs beta and the built-in numpy), alpha 1.1, beta 2.0, a shadowing one, and
    two with compiled parts: one tagged for CPython on Linux, one tagged pure but holding a .so."""
    folder = tmp_path / "index"
    wheel(folder, "alpha", "1.0", {"alpha/__init__.py": "import beta\nX = 10 + beta.Y\n"},
          requires=("beta>=2", "numpy>=1", "winonly; sys_platform == 'win32'"))
    wheel(folder, "alpha", "1.1", {"alpha/__init__.py": "X = 11\n"})
    wheel(folder, "beta", "2.0", {"beta.py": "Y = 2\n"})
    wheel(folder, "shadow", "1.0", {"numpy/__init__.py": "FAKE = True\n", "json.py": "FAKE = True\n",
                                    "shadow.py": "OK = 1\n"})
    wheel(folder, "fast", "1.0", {"fast.py": ""}, tag="cp315-cp315-linux_x86_64", purelib=False)
    wheel(folder, "sneaky", "1.0", {"sneaky/__init__.py": "", "sneaky/_speed.so": "\x7fELF"})
    wheel(folder, "needsfast", "1.0", {"needsfast.py": ""}, requires=("fast",))
    return folder


def policy_file(tmp_path: Path, index: Path, allow: list[str], **keys: object) -> Path:
    lines = [f"allow = {json.dumps(allow)}", f"find_links = [{json.dumps(str(index))}]", "no_index = true"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path = tmp_path / "policy.toml"
    path.write_text("[packages]\n" + "\n".join(lines) + "\n")
    return path


def ubertool(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ubertool_command(), *args], capture_output=True, text=True, timeout=300,
                          env=cli_env(**env))


async def test_allowed_packages_import_with_their_dependencies(tmp_path: Path, index: Path,
                                                               cache: Path) -> None:
    policy = load_policy(policy_file(tmp_path, index, ["alpha==1.0"]))
    async with open_run(policy) as run:
        result = await run.cell("import alpha, beta, numpy\n(alpha.X, alpha.__file__, numpy.__file__)")
        about = await run.cell("import ubertool\nubertool.about()")
    assert str(result.value) == ("(12, '/usr/lib/python-packages/alpha/__init__.py', "
                                 "'/usr/local/lib/python315.zip/numpy/__init__.pyc')"), result
    assert "alpha==1.0, beta==2.0" in str(about.stdout)
    assert len(list((cache / "packages" / "wheels").glob("*.whl"))) == 2  # numpy is built in
    for folder in (cache, cache / "packages", cache / "packages" / "unpacked"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


async def test_version_pins_and_the_newest_that_fits(tmp_path: Path, index: Path, cache: Path) -> None:
    for allow, want in ((["alpha<1.1"], "12"), (["alpha"], "11")):
        async with open_run(load_policy(policy_file(tmp_path, index, allow))) as run:
            result = await run.cell("import alpha\nalpha.X")
        assert str(result.value) == want, result


async def test_built_in_packages_and_the_stdlib_are_never_shadowed(tmp_path: Path, index: Path,
                                                                   cache: Path) -> None:
    async with open_run(load_policy(policy_file(tmp_path, index, ["shadow"]))) as run:
        result = await run.cell("import numpy, json, shadow\n"
                                "(hasattr(numpy, 'FAKE'), hasattr(json, 'FAKE'), shadow.OK)")
    assert str(result.value) == "(False, False, 1)", result


async def test_the_guest_cannot_write_the_package_folder(tmp_path: Path, index: Path, cache: Path) -> None:
    async with open_run(load_policy(policy_file(tmp_path, index, ["alpha==1.0"]))) as run:
        result = await run.cell(
            "import os\nfailed = []\n"
            "for path, mode in [('/usr/lib/python-packages/evil.py', 'w'),\n"
            "                   ('/usr/lib/python-packages/beta.py', 'a'),\n"
            "                   ('/usr/lib/python-packages/alpha/__init__.py', 'w')]:\n"
            "    try:\n        open(path, mode).write('X = 666')\n"
            "    except OSError as exc:\n        failed.append(exc.errno)\n"
            "for act in (lambda: os.remove('/usr/lib/python-packages/beta.py'),\n"
            "            lambda: os.mkdir('/usr/lib/python-packages/new')):\n"
            "    try:\n        act()\n    except OSError as exc:\n        failed.append(exc.errno)\n"
            "import beta\n(len(failed), beta.Y)")
        site = next((cache / "packages" / "sites").iterdir())
        modes = {stat.S_IMODE((site / name).stat().st_mode) for name in ("beta.py", "alpha/__init__.py")}
    assert str(result.value) == "(5, 2)", result
    assert modes == {0o400}
    assert not (site / "evil.py").exists()
    assert not site.exists()  # the run's folder goes with the run; the cache stays
    assert list((cache / "packages" / "unpacked").iterdir())


async def test_compiled_wheels_are_refused_by_name(tmp_path: Path, index: Path, cache: Path) -> None:
    for allow, named in ((["fast"], "fast: the index has no pure-Python wheel"),
                         (["sneaky"], "sneaky-1.0-py3-none-any.whl: has compiled parts (sneaky/_speed.so)"),
                         (["needsfast"], "fast: the index has no pure-Python wheel")):
        with pytest.raises(SandboxStartError, match="packages: ") as caught:
            async with open_run(load_policy(policy_file(tmp_path, index, allow))):
                pass
        assert named in str(caught.value)
    checked = ubertool("policy", "check", str(policy_file(tmp_path, index, ["alpha", "sneaky"])))
    assert checked.returncode == 2
    assert "packages.allow: sneaky-1.0-py3-none-any.whl: has compiled parts" in checked.stderr
    assert not list((cache / "packages" / "unpacked").glob("*/sneaky"))


async def test_a_built_in_version_that_does_not_fit_is_refused(tmp_path: Path, index: Path,
                                                               cache: Path) -> None:
    checked = ubertool("policy", "check", str(policy_file(tmp_path, index, ["numpy<2"])))
    assert checked.returncode == 2
    assert "the sandbox has numpy 2.5.2 built in, which this excludes" in checked.stderr


def test_a_metadata_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """64 MiB of METADATA compresses to about 64 KiB: the wheel is small, its headers are not."""
    bomb = wheel(tmp_path, "bomb", "1.0", {"bomb.py": ""}, description="\n" + "X" * 64 * 2**20)
    assert bomb.stat().st_size < MAX_METADATA_BYTES
    with pytest.raises(PackageError, match="METADATA is larger than"):
        inspect_wheel(bomb)


def test_unpacking_never_leaves_the_folder(tmp_path: Path) -> None:
    for number, member in enumerate(("../evil.py", "/abs.py", "a/../../evil.py", "ok\\..\\evil.py")):
        target = tmp_path / f"unpacked-{number}"
        bad = tmp_path / "bad.whl"
        with zipfile.ZipFile(bad, "w") as zipped:
            zipped.writestr("fine.py", "")
            zipped.writestr(member, "pwned")
        with pytest.raises(PackageError, match="outside the package folder"):
            unpack_wheel(bad, target)
        assert not (tmp_path / "evil.py").exists() and not Path("/abs.py").exists()
        assert not (target / "fine.py").exists()  # nothing written before every name was checked


async def test_install_at_run_time_restore_and_playbook_offline(tmp_path: Path, index: Path, cache: Path,
                                                                _isolated_home: Path) -> None:
    path = policy_file(tmp_path, index, ["alpha==1.0", "shadow"], preload=False, guest_install=True)
    with Journal(default_journal_path()) as journal:
        async with open_run(load_policy(path), journal=journal) as run:
            missing = await run.cell("import alpha")
            assert missing.error is not None and missing.error.type == "ModuleNotFoundError"
            installed = await run.cell("import ubertool\nprint(ubertool.install('alpha'))\nimport alpha")
            assert str(installed.stdout) == "['alpha==1.0', 'beta==2.0']\n", installed
            refused = await run.cell("ubertool.install('fast')")
            assert refused.error is not None and "packages.allow does not list fast" in refused.error.message
            stopped = await run.cell("import time\ntime.sleep(100)", timeout_s=1)  # a hard stop: rolled back
            assert stopped.restored is not None and stopped.restored.ok, stopped
            after = await run.cell("import alpha\nprint(alpha.X)")
            assert str(after.stdout) == "12\n", after
            run_id = run.id
    out = tmp_path / "books" / "pk.py"
    dumped = ubertool("sessions", "dump", run_id, "-o", str(out))
    assert dumped.returncode == 0, dumped.stderr
    header = json.loads(out.read_text().splitlines()[2].split(":", 1)[1])
    assert header["packages"] == ["alpha==1.0", "beta==2.0"]
    # A fresh state folder, the index gone: the replay installs the header's versions from the cache.
    for whl in index.iterdir():
        whl.unlink()
    fresh = tmp_path / "fresh-home"
    replayed = ubertool("replay", "--offline", str(out), UBERTOOL_HOME=str(fresh))
    assert (replayed.returncode, replayed.stdout) == (0, "['alpha==1.0', 'beta==2.0']\n12\n"), replayed.stderr


async def test_packages_list_and_sync(tmp_path: Path, index: Path, cache: Path) -> None:
    path = str(policy_file(tmp_path, index, ["alpha==1.0", "tabulate"]))
    before = ubertool("packages", "list", "--policy", path)
    assert "Not in the cache yet" in before.stdout and "tabulate: built into the sandbox" in before.stdout
    synced = ubertool("packages", "sync", "--policy", path)
    assert synced.returncode == 0 and "alpha==1.0" in synced.stdout and "beta==2.0" in synced.stdout
    os.rename(index, tmp_path / "gone")  # offline from here on
    listed = ubertool("packages", "list", "--policy", path)
    assert "alpha==1.0  alpha-1.0-py3-none-any.whl" in listed.stdout, listed
    ran = ubertool("run", "--policy", path, "-c", "import alpha; alpha.X")
    assert (ran.returncode, ran.stdout) == (0, "12\n"), ran.stderr


@pytest.mark.skipif(not os.environ.get("UBERTOOL_NETWORK_TESTS"), reason="set UBERTOOL_NETWORK_TESTS=1")
async def test_the_real_index(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[packages]\nallow = ["python-slugify"]\n')  # pure, with a pure dependency
    async with open_run(load_policy(path)) as run:
        result = await run.cell("import slugify\nslugify.slugify('Hello World')")
    assert str(result.value) == "'hello-world'", result
