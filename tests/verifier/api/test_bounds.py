"""The verifier's bounds on generations, against the real server (gRPC + HTTP on free loopback
ports, the SmolLM2 model, no retriever): a non-streamed HTTP request whose client leaves stops its
generation within a step or so; beyond `max_queued` waiting generations HTTP answers 429 with
Retry-After and gRPC RESOURCE_EXHAUSTED; `request_deadline_s` cuts a long generation (504 /
DEADLINE_EXCEEDED), and a gRPC call's own deadline ends its generation. Progress is read from the
step counter of /metrics, never from wall time."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import grpc
import openai
import pytest

from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from tests.metrics_scrape import scrape, value
from tests.verifier.api.test_service import REPEAT, request
from verifier.api.settings import VerifierSettings

LONG = 400  # tokens of a long generation: one per step without drafts, many seconds on this machine
MAX_QUEUED = 2


@pytest.fixture(scope="module")
def engine(smollm2):
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    return Engine(smollm2, CostModel.flat())


def _server(engine, **settings):
    from verifier.api.server import create_server

    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, max_new_tokens_cap=512,
                                               **settings), engine=engine)
    return server


@pytest.fixture(scope="module")
def server(engine):
    server = _server(engine, max_queued=MAX_QUEUED)
    yield server
    server.stop(0).wait()


@pytest.fixture(scope="module")
def strict(engine):
    """A server whose generations must end within 1 s."""
    server = _server(engine, request_deadline_s=1.0)
    yield server
    server.stop(0).wait()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def _steps(server) -> float:
    return value(scrape(_url(server) + "/metrics"), "specdraft_verifier_steps_total")


def _ended(server, reason: str, api: str = "http") -> float:
    return value(scrape(_url(server) + "/metrics"), "specdraft_verifier_generations_total", api=api,
                 finish_reason=reason)


def _wait_for(predicate) -> None:
    """Polls until `predicate()` holds (a liveness wait, not a timed assertion)."""
    for _ in range(3000):
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("the server never reached the awaited state")


def _post(server, body: dict) -> tuple[int, Message, dict]:
    req = urllib.request.Request(_url(server) + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def _long_body() -> bytes:
    return json.dumps({"prompt": REPEAT, "max_tokens": LONG, "temperature": 0, "no_draft": True}).encode()


def _raw_request(server, body: bytes) -> socket.socket:
    """A non-streamed completion sent on a raw socket (closing it is the client leaving)."""
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: verifier\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_a_client_leaving_a_non_streamed_request_stops_its_generation(server):
    start, cancelled = _steps(server), _ended(server, "cancelled")
    sock = _raw_request(server, _long_body())
    _wait_for(lambda: _steps(server) > start)
    time.sleep(1.0)  # ~1 s into the generation, as a client timing out would
    at_close = _steps(server)
    sock.close()
    status, _, reply = _post(server, {"prompt": "def f(", "max_tokens": 1, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1
    after = _steps(server)
    assert _ended(server, "cancelled") == cancelled + 1
    # cut within a step or two of the close (the step running then, one racing the scrape), plus
    # the short request's one step; without the detection all LONG steps ran first
    assert after - at_close <= 4 and after - start < LONG


def test_waiting_requests_beyond_the_queue_get_429_with_retry_after(server):
    client = openai.OpenAI(base_url=_url(server) + "/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.completions.create(model="smollm2", prompt=REPEAT, max_tokens=LONG, temperature=0, stream=True,
                                       extra_body={"no_draft": True})
    next(iter(stream))  # it holds the model now
    answers: list[int] = []
    waiting = [threading.Thread(target=lambda: answers.append(_post(server, {"prompt": "x", "max_tokens": 1})[0]))
               for _ in range(MAX_QUEUED)]
    for t in waiting:
        t.start()
    gauge = "specdraft_verifier_queued_generations"
    _wait_for(lambda: value(scrape(_url(server) + "/metrics"), gauge) == MAX_QUEUED)
    status, headers, reply = _post(server, {"prompt": "x", "max_tokens": 1})
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert reply["error"]["type"] == "rate_limit_error" and reply["error"]["code"] == "queue_full"
    assert f"must be at most {MAX_QUEUED}, got {MAX_QUEUED} waiting" in reply["error"]["message"]
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.VerifierStub(channel).Generate(request(max_new_tokens=1)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(e.value.trailing_metadata())["retry-after"]) >= 1
    stream.close()
    for t in waiting:
        t.join()
    assert answers == [200] * MAX_QUEUED
    assert value(scrape(_url(server) + "/metrics"), gauge) == 0


def test_the_deadline_cuts_a_long_generation(strict):
    start, cut = _steps(strict), _ended(strict, "deadline")
    status, _, reply = _post(strict, json.loads(_long_body()))
    assert status == 504 and reply["error"]["code"] == "deadline_exceeded"
    assert reply["error"]["type"] == "server_error" and "must end before its deadline" in reply["error"]["message"]
    assert _ended(strict, "deadline") == cut + 1 and _steps(strict) - start < LONG
    with grpc.insecure_channel(f"127.0.0.1:{strict.ports.grpc}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.VerifierStub(channel).Generate(request(max_new_tokens=LONG, no_draft=True)))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "must end before" in e.value.details()


def test_a_grpc_call_deadline_ends_its_generation(server):
    start, cancelled = _steps(server), _ended(server, "cancelled", "grpc")
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.VerifierStub(channel).Generate(request(max_new_tokens=LONG, no_draft=True), timeout=1.0))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status, _, _ = _post(server, {"prompt": "def f(", "max_tokens": 1, "temperature": 0})
    assert status == 200
    _wait_for(lambda: _ended(server, "cancelled", "grpc") == cancelled + 1)
    assert _steps(server) - start < LONG
