"""The formatter process's loop over real ZeroMQ sockets: the test holds the gateway's
DEALER and the scheduler's ROUTER, so it sees exactly what the formatter sends each way."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from services.formatter.main import FormatterService
from shared import telemetry
from shared.config import Settings
from shared.protocol import Abort, Delta, GenerateRequest, Ping, Pong, Submit, TokenEvent, decode, encode

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ends:
    """The test's sockets: a gateway DEALER and the scheduler's ROUTER."""

    def __init__(self, settings):
        ctx = zmq.Context.instance()
        self.scheduler = ctx.socket(zmq.ROUTER)
        self.scheduler.setsockopt(zmq.LINGER, 0)
        self.scheduler.bind(settings.scheduler_frontend)
        self.gateway = ctx.socket(zmq.DEALER)
        self.gateway.setsockopt(zmq.LINGER, 0)
        self.gateway.connect(settings.formatter_bind)
        self.formatter_id = None
        self.answer_pings = True
        self.ready = True

    def from_formatter(self, timeout=3.0):
        """Next non-Ping message the formatter sent the scheduler (Pings answered on the way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.scheduler.poll(50):
                ident, frame = self.scheduler.recv_multipart()
                self.formatter_id = ident
                message = decode(frame)
                if isinstance(message, Ping):
                    if self.answer_pings:
                        self.to_formatter(Pong(message.sent_at, self.ready, ["tiny"], 1))
                    continue
                return message
        return None

    def to_formatter(self, message):
        self.scheduler.send_multipart([self.formatter_id, encode(message)])

    def to_gateway(self, timeout=3.0):
        """Next message the formatter sent the gateway, answering scheduler pings meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gateway.poll(20):
                return decode(self.gateway.recv())
            other = self.from_formatter(timeout=0.02)
            assert other is None, f"unexpected {other}"
        return None


@pytest.fixture(scope="module")
def ends(vocab_dir):
    settings = Settings(
        formatter_bind=f"tcp://127.0.0.1:{free_port()}",
        scheduler_frontend=f"tcp://127.0.0.1:{free_port()}",
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
        tiktoken_encodings_base=vocab_dir,
    )
    telemetry.setup_tracing("formatter-test", settings)
    ends = Ends(settings)
    service = FormatterService(settings, zmq.Context.instance())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    ends.service = service
    yield ends
    service.stop()
    thread.join(5)
    ends.gateway.close(0), ends.scheduler.close(0)
    telemetry.shutdown_tracing()


def eventually(check, timeout=2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def wait_ready(ends):
    for _ in range(100):
        ends.gateway.send(encode(Ping(1.0)))
        pong = ends.to_gateway()
        if isinstance(pong, Pong) and pong.ready:
            return pong
        assert ends.from_formatter(timeout=0.05) is None  # answers the formatter's pings
    raise AssertionError("the formatter never reported ready")


def test_pong_reports_what_the_scheduler_said(ends):
    pong = wait_ready(ends)
    assert pong.models == ["tiny"] and pong.workers == 1 and pong.sent_at == 1.0


def test_request_round_trip_with_trace(ends):
    wait_ready(ends)
    parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    ends.gateway.send(encode(GenerateRequest("req-1", "chat", CHAT, parent)))
    submit = ends.from_formatter()
    assert isinstance(submit, Submit) and submit.request_id == "req-1/0"
    assert ends.service.encoding.decode(submit.token_ids).endswith("<|start|>user<|message|>hi<|end|><|start|>assistant")
    assert submit.params.max_tokens == 4
    # one trace across services: the Submit carries the same trace id, a new parent span
    assert submit.trace["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert submit.trace["traceparent"].split("-")[2] != "b7ad6b7169203331"
    ids = ends.service.encoding.encode("<|channel|>final<|message|>Hi!<|return|>", allowed_special="all")
    ends.to_formatter(TokenEvent("req-1/0", ids[:3], prompt_tokens=len(submit.token_ids)))
    ends.to_formatter(TokenEvent("req-1/0", ids[3:], finish_reason="stop", cached_tokens=16))
    deltas = [ends.to_gateway(), ends.to_gateway()]
    assert all(isinstance(d, Delta) and d.request_id == "req-1" for d in deltas)
    assert "".join(d.content for d in deltas) == "Hi!"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(ids)
    assert deltas[-1].prompt_tokens == len(submit.token_ids) and deltas[-1].cached_tokens == 16
    assert eventually(lambda: not ends.service.inflight)  # forgotten once finished


def test_events_relayed_together_come_out_as_one_message_in_order(ends):
    wait_ready(ends)
    ends.gateway.send(encode(GenerateRequest("req-m", "completion", {"model": "tiny", "prompt": "x", "max_tokens": 9})))
    submit = ends.from_formatter()
    pieces = [ends.service.encoding.encode(text) for text in ("one", " two", " three")]
    events = [TokenEvent("req-m/0", pieces[0]), TokenEvent("req-m/0", pieces[1]),
              TokenEvent("req-m/0", pieces[2], finish_reason="length", prompt_tokens=len(submit.token_ids))]
    ends.scheduler.send_multipart([ends.formatter_id, *map(encode, events)])  # one step's events, one message
    assert ends.gateway.poll(3000)
    deltas = [decode(frame) for frame in ends.gateway.recv_multipart()]
    assert [d.content for d in deltas] == ["one", " two", " three"]
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == sum(map(len, pieces))
    assert eventually(lambda: not ends.service.inflight)


def test_gateway_abort_reaches_the_scheduler(ends):
    wait_ready(ends)
    ends.gateway.send(encode(GenerateRequest("req-2", "completion", {"model": "tiny", "prompt": "x", "n": 2})))
    subs = [ends.from_formatter(), ends.from_formatter()]
    assert [s.request_id for s in subs] == ["req-2/0", "req-2/1"]
    ends.gateway.send(encode(Abort("req-2", "client")))
    aborts = [ends.from_formatter(), ends.from_formatter()]
    assert sorted(a.request_id for a in aborts) == ["req-2/0", "req-2/1"]
    assert eventually(lambda: not ends.service.inflight)  # forgotten once finished


def test_errors_from_below_and_render_errors_become_error_deltas(ends):
    wait_ready(ends)
    ends.gateway.send(encode(GenerateRequest("req-3", "chat", {**CHAT, "messages": [{"role": "tool", "content": "x"}]})))
    delta = ends.to_gateway()
    assert delta.error and delta.status == 400 and delta.finish_reason == "error"
    ends.gateway.send(encode(GenerateRequest("req-4", "chat", CHAT)))
    ends.from_formatter()
    ends.to_formatter(TokenEvent("req-4/0", error="too many requests queued", status=429, finish_reason="error"))
    delta = ends.to_gateway()
    assert delta.error == "too many requests queued" and delta.status == 429


def test_bad_frames_are_dropped_and_service_keeps_going(ends):
    ends.gateway.send(b"\x93not msgpack at all")
    ends.gateway.send_multipart([b"two", b"frames"])
    assert wait_ready(ends).ready


def test_silent_scheduler_fails_in_flight_requests(ends):
    wait_ready(ends)
    ends.gateway.send(encode(GenerateRequest("req-5", "chat", CHAT)))
    assert isinstance(ends.from_formatter(), Submit)
    ends.answer_pings = False
    deadline = time.monotonic() + 3
    delta = None
    while delta is None and time.monotonic() < deadline:
        if ends.gateway.poll(50):
            delta = decode(ends.gateway.recv())
        ends.from_formatter(timeout=0.01)
    assert delta is not None and delta.request_id == "req-5" and delta.status == 503
    ends.gateway.send(encode(Ping(2.0)))
    assert ends.to_gateway().ready is False
    ends.answer_pings = True


def test_a_gone_gateway_gets_its_requests_aborted(ends):
    wait_ready(ends)
    other = zmq.Context.instance().socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.connect(ends.service.settings.formatter_bind)
    other.send(encode(GenerateRequest("req-6", "chat", CHAT)))
    submit = ends.from_formatter()
    assert submit.request_id == "req-6/0"
    other.close(0)  # the gateway goes away mid-request
    time.sleep(0.2)
    ends.to_formatter(TokenEvent("req-6/0", [1, 2, 3]))
    abort = ends.from_formatter()
    assert isinstance(abort, Abort) and abort.request_id == "req-6/0"


def test_a_dropped_scheduler_connection_fails_requests_at_once(vocab_dir):
    """Its own formatter: the scheduler end is closed mid-request, well inside heartbeat_timeout."""
    settings = Settings(
        formatter_bind=f"tcp://127.0.0.1:{free_port()}",
        scheduler_frontend=f"tcp://127.0.0.1:{free_port()}",
        heartbeat_interval=0.05,
        heartbeat_timeout=30,
        tiktoken_encodings_base=vocab_dir,
    )
    ends = Ends(settings)
    service = FormatterService(settings, zmq.Context.instance())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        wait_ready(ends)
        ends.gateway.send(encode(GenerateRequest("req-7", "chat", CHAT)))
        assert isinstance(ends.from_formatter(), Submit)
        started = time.monotonic()
        ends.scheduler.close(0)  # the scheduler process goes away
        assert ends.gateway.poll(5000)
        delta = decode(ends.gateway.recv())
        assert delta.request_id == "req-7" and delta.status == 503 and "dropped" in delta.error
        assert time.monotonic() - started < 5
        # no longer ready on the gone scheduler's word (heartbeat_timeout is 30 s), nor taking requests
        ends.gateway.send(encode(Ping(3.0)))
        pong = ends.to_gateway()
        assert pong.ready is False and pong.workers == 0 and pong.models == []
        ends.gateway.send(encode(GenerateRequest("req-8", "chat", CHAT)))
        refused = ends.to_gateway()
        assert refused.request_id == "req-8" and refused.status == 503
    finally:
        service.stop()
        thread.join(5)
        ends.gateway.close(0)
