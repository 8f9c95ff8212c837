"""One request is one trace across gateway, formatter, scheduler and worker.

The services export OTLP/HTTP (protobuf) to a small collector running in this test
process, which decodes every ExportTraceServiceRequest it receives.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

pytestmark = pytest.mark.e2e

SERVICES = {"rose-gateway", "rose-formatter", "rose-scheduler", "rose-worker"}


class Collector:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf body (gzip or not)."""

    def __init__(self):
        self.spans: list[tuple[str, str, bytes, bytes, bytes]] = []  # (service, name, trace id, span id, parent id)
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((service, span.name, span.trace_id, span.span_id, span.parent_span_id))

    def traces(self) -> dict[bytes, list[tuple]]:
        by_trace = defaultdict(list)
        with self.lock:
            for span in self.spans:
                by_trace[span[2]].append(span)
        return by_trace

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.close()


def test_one_trace_spans_all_four_services(mesh, collector):
    m = mesh(formatters=1, workers=1, env={
        "ROSE_OTEL_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
    })
    client = openai.OpenAI(base_url=m.base_url, api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="gpt-oss-tiny", messages=[{"role": "user", "content": "trace me"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("length", "stop")
    client.close()

    deadline = time.monotonic() + 10
    full = []
    while time.monotonic() < deadline and not full:
        full = [spans for spans in collector.traces().values() if SERVICES <= {s[0] for s in spans}]
        time.sleep(0.1)
    seen = {s[0] for s in collector.spans}
    assert full, f"no trace covers all four services; services seen: {sorted(seen)}"
    spans = full[0]
    # one tree: every span but the root names a parent inside the same trace
    ids = {s[3] for s in spans}
    roots = [s for s in spans if s[4] not in ids]
    assert len(roots) == 1, f"the trace is not one tree: roots {[(r[0], r[1]) for r in roots]}"
    assert roots[0][0] == "rose-gateway"
    by_name = {(s[0], s[1]): s for s in spans}
    scheduler = by_name[("rose-scheduler", "scheduler.request")]
    worker = by_name[("rose-worker", "worker.generate")]
    assert worker[4] == scheduler[3], "the worker's span is a child of the scheduler's"
    assert next(s for s in spans if s[3] == scheduler[4])[0] == "rose-formatter"
