"""Property-based tests (hypothesis): the policy parser and the arguments host tools accept."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubertool.runtime.policy import Policy, PolicyError, parse_policy, policy_document
from ubertool.tools import ToolFailure
from ubertool.tools.mounts.http import HttpMount, HttpMountSpec
from ubertool.tools.programs import ProgramBroker, ProgramSpec
from ubertool.tools.recorder import Recorder, Spool
from ubertool.tools.redact import Redactor

KEYS = st.sampled_from(["version", "limits", "workspace", "grants", "mounts", "credentials", "tools",
                        "timeout_s", "max_timeout_s", "memory_mib", "guest", "host", "kind", "name",
                        "base_url", "source", "env", "programs", "argv", "bogus", "keep", "guest_path"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
TOML_LIKE = st.recursive(
    SCALARS.filter(lambda v: v is not None),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, TOML_LIKE, max_size=5))
def test_any_document_is_a_policy_or_a_clear_error(data: dict) -> None:
    try:
        policy = parse_policy(data, "p.toml", Path("/nonexistent-base"))
    except PolicyError as exc:
        assert exc.problems
        for line in exc.problems:
            assert re.match(r"^p\.toml(:\d+)?: [\w.()\[\] -]+: .+", line), line
    else:
        assert isinstance(policy, Policy)


@settings(max_examples=100, deadline=None)
@given(timeout=st.floats(0.01, 300), extra=st.floats(0, 1000), memory=st.integers(32, 4096),
       output=st.integers(1024, 64 * 2**20))
def test_valid_limits_survive_show_and_parse_again(timeout: float, extra: float, memory: int,
                                                   output: int) -> None:
    limits = {"timeout_s": timeout, "max_timeout_s": min(timeout + extra, 86_400.0), "memory_mib": memory,
              "output_bytes": output}
    policy = parse_policy({"limits": limits}, "p.toml", None)
    again = parse_policy({k: v for k, v in policy_document(policy).items() if k != "grants"}, "p.toml", None)
    assert again.limits == policy.limits


SEGMENT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"), min_size=1,
                  max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(SEGMENT, min_size=1, max_size=5))
def test_mount_urls_never_leave_the_base(segments: list[str]) -> None:
    spec = HttpMountSpec(kind="http", name="api", guest="/api", base_url="http://127.0.0.1:9/v1")
    mount = HttpMount(spec, credentials=None, recorder=Recorder(), redactor=Redactor(),
                      spool=Spool(Path(tempfile.gettempdir()) / "unused-spool"))
    try:
        url = mount._url("/" + "/".join(segments))
    except PermissionError:
        assert any(s in (".", "..") for s in segments)
        return
    finally:
        mount.close()
    assert url.startswith("http://127.0.0.1:9/v1/")
    rest = url.removeprefix("http://127.0.0.1:9/v1/")
    assert not any(part in (".", "..") for part in rest.split("/"))
    assert "?" not in rest and "#" not in rest


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=10), args=st.lists(st.text(max_size=10), max_size=4))
def test_program_spawn_refuses_anything_not_allowed(tmp_path_factory: pytest.TempPathFactory, name: str,
                                                     args: list[str]) -> None:
    specs = {"echo": ProgramSpec(argv=("echo",), extra_args=2)}
    folder = tmp_path_factory.mktemp("w")
    with ProgramBroker(specs, folder, recorder=Recorder(), redactor=Redactor()) as broker:
        try:
            answer = broker.programs_spawn(name, args)
        except ToolFailure as exc:
            assert str(exc)
            return
        assert name == "echo" and len(args) <= 2
        assert all(re.fullmatch(specs["echo"].arg_pattern, a) for a in args)
        broker.programs_close(answer["handle"])
