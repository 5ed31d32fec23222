"""OpenTelemetry through a real MCP client: the SDK's in-memory exporter and reader stand in
for a collector. The client's `traceparent` in `_meta` parents the call's span; cells, mount
requests, host-tool calls and credential mints are spans below it with the audit ids; no span
holds a secret, cell code or output; metrics count sessions and cells. And `[telemetry]` is
validated, with OTLP/HTTP really sent to a collector on loopback when configured."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any, ClassVar

import anyio
import pytest
import uvicorn
from conftest import cli_env, ubertool_command
from fakeapi import serve_api
from fastmcp import Client
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from servers import free_port

from ubertool.runtime.policy import Policy, PolicyError, load_policy
from ubertool.runtime.server import build_server
from ubertool.runtime.sessions import SessionManager

pytestmark = pytest.mark.anyio

SECRET = "tok-3b9f-never-in-a-span"
CODE_MARK = "code_marker_4471"
OUTPUT_MARK = "output-marker-9921"
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@contextmanager
def http_server(policy: Policy) -> Iterator[str]:
    """The MCP server over streamable HTTP on a loopback port, in a thread of its own (so that
    nothing but the request carries the client's context into it); its /mcp URL."""
    port, servers = free_port(), []

    async def serve() -> None:
        async with SessionManager(policy).running() as manager:
            app = build_server(manager).http_app(transport="http")
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
            servers.append(uvicorn.Server(config))
            await servers[0].serve()

    thread = Thread(target=anyio.run, args=(serve,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (servers and servers[0].started) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        servers[0].should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    """The SDK, installed once for the process (OpenTelemetry allows one provider)."""
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    meter = MeterProvider(metric_readers=[reader])
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(meter)
    yield spans, reader
    provider.shutdown()  # later tests record nothing
    meter.shutdown()


def policy_text(url: str) -> str:
    return (f"[[mounts]]\nkind = 'http'\nname = 'api'\nguest = '/api'\nbase_url = '{url}/v1'\n"
            "credential = 'apitoken'\n[credentials.apitoken]\nsource = 'env'\nenv = 'API_TOKEN'\n"
            "[tools.programs.echo]\nargv = ['echo']\nextra_args = 2\n")


def everything(span: ReadableSpan) -> str:
    """All a span would export, as text."""
    return json.dumps([span.name, dict(span.attributes or {}), [(e.name, dict(e.attributes or {}))
                                                                for e in span.events],
                       span.status.description, dict(span.resource.attributes)], default=str)


def counted(reader: InMemoryMetricReader, name: str) -> dict[str, Any]:
    data = reader.get_metrics_data()
    return {json.dumps(dict(point.attributes or {}), sort_keys=True): point.value
            for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
            if metric.name == name for point in metric.data.data_points}


async def test_spans_continue_the_clients_trace_and_hold_no_secret(
        otel: tuple[InMemorySpanExporter, InMemoryMetricReader], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spans, reader = otel
    spans.clear()
    monkeypatch.setenv("API_TOKEN", SECRET)
    with serve_api() as (url, state):
        state.required_token = SECRET
        state.files["/hello.txt"] = b"hello " + OUTPUT_MARK.encode()
        policy = tmp_path / "policy.toml"
        policy.write_text(policy_text(url))
        with http_server(load_policy(policy)) as mcp_url:
            async with Client(mcp_url) as client:
                # The client's trace: its span for the call is a child of ours, and reaches the
                # server (in another thread, another context) only as `traceparent` in `_meta`.
                parent = trace.NonRecordingSpan(SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), True,
                                                            TraceFlags(TraceFlags.SAMPLED)))
                with trace.use_span(parent):
                    result = await client.call_tool("python", {"code": (
                        f"{CODE_MARK} = open('/api/hello.txt').read()\nprint({CODE_MARK}, '{SECRET[:3]}')\n"
                        "from ubertool import programs\ne = programs.spawn('echo', ['x', 'y'])\n"
                        "e.expect('y')")})
                assert OUTPUT_MARK in result.structured_content["stdout"], result.structured_content
                handle = result.structured_content["session"]
                assert counted(reader, "ubertool.sessions") == {"{}": 1}
                # One long C call: stopped hard, then the session is restored by replay.
                stopped = await client.call_tool("python", {"code": "import time\ntime.sleep(100)",
                                                            "timeout_s": 1, "session": handle},
                                                 raise_on_error=False)
                assert stopped.structured_content["status"] == "timeout"
                refused = await client.call_tool("python", {"code": "1", "session": "s-nope"},
                                                 raise_on_error=False)
                assert refused.is_error
        assert counted(reader, "ubertool.sessions") == {"{}": 0}  # closed with the server
    assert counted(reader, "ubertool.cells") == {'{"status": "ok"}': 1, '{"status": "timeout"}': 1}
    assert counted(reader, "ubertool.restores") == {'{"ok": true}': 1}
    assert counted(reader, "ubertool.errors") == {'{"kind": "cell"}': 1, '{"kind": "refused"}': 1}

    finished = spans.get_finished_spans()
    client_side = {s.context.span_id: s for s in finished if s.kind == trace.SpanKind.CLIENT}
    calls = [s for s in finished if s.kind == trace.SpanKind.SERVER and s.name.startswith("tools/call")]
    call = min(calls, key=lambda s: s.start_time)
    assert f"{call.context.trace_id:032x}" == TRACE_ID
    ancestor = call.parent.span_id  # the client's span that sent the request (its `traceparent`)
    while ancestor in client_side:
        ancestor = client_side[ancestor].parent.span_id
    assert call.parent.span_id in client_side and ancestor == int(PARENT_ID, 16)
    cell, timed_out = sorted((s for s in finished if s.name == "ubertool.cell"), key=lambda s: s.start_time)
    assert timed_out.status.status_code == trace.StatusCode.ERROR
    assert timed_out.attributes["error.type"] == "timeout" and timed_out.attributes["ubertool.cell"] == 2
    run_id = call.attributes["ubertool.run"]
    assert call.attributes["ubertool.session"] == handle and cell.parent.span_id == call.context.span_id
    assert (cell.attributes["ubertool.run"], cell.attributes["ubertool.session"]) == (run_id, handle)
    assert cell.attributes["ubertool.status"] == "ok" and cell.attributes["ubertool.code_sha256"]
    below = {s.name: s for s in finished if s.parent is not None and s.parent.span_id == cell.context.span_id}
    assert {"ubertool.mount.request", "ubertool.tool.call"} <= set(below), sorted(below)
    mount = below["ubertool.mount.request"]
    assert (mount.attributes["ubertool.mount"], mount.attributes["ubertool.method"]) == ("api", "GET")
    assert mount.attributes["http.response.status_code"] == 200 and mount.attributes["ubertool.run"] == run_id
    (mint,) = [s for s in finished if s.name == "ubertool.credential.mint"]
    assert mint.parent.span_id == mount.context.span_id
    assert mint.attributes["ubertool.credential"] == "apitoken"
    tools = [s.attributes["ubertool.tool"] for s in finished if s.name == "ubertool.tool.call"]
    assert tools == ["programs.spawn", "programs.expect"]
    for span in finished:
        text = everything(span)
        assert SECRET not in text and CODE_MARK not in text and OUTPUT_MARK not in text, text


def test_telemetry_keys_are_checked(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[telemetry]\notlp_endpoint = 'collector:4318'\n")
    with pytest.raises(PolicyError) as bad:
        load_policy(policy)
    assert "telemetry.otlp_endpoint: String should match pattern" in str(bad.value)
    policy.write_text("[telemetry]\nendpoint = 'http://127.0.0.1:4318'\n")
    with pytest.raises(PolicyError, match=r"telemetry.endpoint: unknown key"):
        load_policy(policy)


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        self.received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("configured", ["policy", "environment"])
def test_a_configured_endpoint_receives_spans_and_metrics_over_otlp(tmp_path: Path, configured: str) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    Thread(target=collector.serve_forever, daemon=True).start()
    _Collector.received.clear()
    url = f"http://127.0.0.1:{collector.server_port}"
    try:
        policy = tmp_path / "policy.toml"
        policy.write_text("[telemetry]\nservice_name = 'ubertool-test'\n"
                          + (f"otlp_endpoint = '{url}'\n" if configured == "policy" else ""))
        env = cli_env(**({"OTEL_EXPORTER_OTLP_ENDPOINT": url} if configured == "environment" else {}))
        done = subprocess.run([ubertool_command(), "run", "--policy", str(policy), "-c", "print(1 + 1)"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert (done.returncode, done.stdout) == (0, "2\n"), done.stderr
    finally:
        collector.shutdown()
    paths = {path for path, _ in _Collector.received}
    assert paths == {"/v1/traces", "/v1/metrics"}, paths
    exported = ExportTraceServiceRequest()
    for path, body in _Collector.received:
        if path == "/v1/traces":
            exported.MergeFromString(body)
    names = [s.name for rs in exported.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert "ubertool.cell" in names
    assert "ubertool-test" in str(exported.resource_spans[0].resource)


def test_telemetry_is_off_unless_configured() -> None:
    """No endpoint: the SDK is not even imported (a server starts as fast as before)."""
    code = ("import sys\nfrom ubertool.runtime.policy import default_policy\n"
            "from ubertool.runtime.telemetry import telemetry\nwith telemetry(default_policy()): pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))")
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in cli_env().items() if not k.startswith("OTEL_")})
    assert done.stdout == "[]\n", done.stderr
