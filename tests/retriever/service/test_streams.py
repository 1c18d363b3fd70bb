"""Open DraftStreams (issue 18 item 2), through real servers: idle streams beyond what grpc's old
RPC cap (max_inflight + max_queued) held leave health checks and other clients' Drafts working;
the per-address stream cap refuses with a precise RESOURCE_EXHAUSTED; a stream idle past
`stream_idle_s` is ended by the server together with its sessions."""

from __future__ import annotations

import queue

import grpc
import pytest

from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever.service.helpers import PROMPT, SERVING, Running, error_of, req, settings


class HeldStream:
    """A DraftStream from a sync client, fed one request at a time."""

    def __init__(self, stub: pb_grpc.RetrieverStub) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.call = stub.DraftStream(iter(self.requests.get, None))

    def send(self, request):
        self.requests.put(request)
        return next(self.call)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def on_loop(running: Running, fn):
    import asyncio

    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), running.server._loop).result(5)


@pytest.fixture()
def small():
    running = Running(settings(max_inflight=2, max_queued=2, max_streams_per_peer=3, max_streams=40))
    assert running.server.wait_ready(30)
    yield running
    running.close()


def test_idle_streams_beyond_the_drafting_cap_leave_health_and_a_fresh_clients_draft_working():
    running = Running(settings(max_inflight=2, max_queued=2, max_streams_per_peer=64))  # grpc used to hold 4 RPCs
    assert running.server.wait_ready(30)
    channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}") for _ in range(3)]
    held = [HeldStream(pb_grpc.RetrieverStub(channels[i % 3])) for i in range(12)]
    try:
        for i, stream in enumerate(held):
            assert stream.send(req(session_id=f"idle{i}", prompt=PROMPT)).context_tokens == len(PROMPT)
        assert running.health_of("") == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as fresh:
            reply = pb_grpc.RetrieverStub(fresh).Draft(req(session_id="fresh", prompt=PROMPT), timeout=5)
        assert reply.context_tokens == len(PROMPT)
        assert on_loop(running, lambda: running.server._inner.servicer.streams.open_streams) == 12
    finally:
        for stream in held:
            stream.close()
        for channel in channels:
            channel.close()
        running.close()


def test_streams_beyond_the_per_address_cap_are_refused_precisely_and_slots_come_back(small):
    held = [HeldStream(small.stub) for _ in range(3)]
    for i, stream in enumerate(held):
        stream.send(req(session_id=f"s{i}", prompt=PROMPT))
    extra = HeldStream(small.stub)
    with pytest.raises(grpc.RpcError) as info:
        extra.send(req(session_id="extra", prompt=PROMPT))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == ("open DraftStreams from ipv4:127.0.0.1 must be at most 3, got 4: "
                                    "end idle streams before opening more")
    assert small.health_of("") == SERVING
    held[0].close()
    servicer = small.server._inner.servicer
    import time
    deadline = time.monotonic() + 5
    while on_loop(small, lambda: servicer.streams.open_streams) != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    again = HeldStream(small.stub)
    assert again.send(req(session_id="again", prompt=PROMPT)).context_tokens == len(PROMPT)
    for stream in (*held[1:], again, extra):
        stream.close()


def test_an_idle_stream_is_ended_by_the_server_with_its_sessions():
    running = Running(settings(stream_idle_s=0.3))
    assert running.server.wait_ready(30)
    try:
        stream = HeldStream(running.stub)
        stream.send(req(session_id="quiet", prompt=PROMPT))
        with pytest.raises(grpc.RpcError) as info:
            next(stream.call)  # no request: the server ends the stream after stream_idle_s
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == ("DraftStream must send a request at least every 0.3 s, got none for 0.3 s: "
                                        "the stream and its sessions ended")
        error = error_of(running.stub.Draft, req(session_id="quiet", new_tokens=[1]))
        assert error.code() == grpc.StatusCode.NOT_FOUND  # its session ended with it
        servicer = running.server._inner.servicer
        assert on_loop(running, lambda: servicer.streams.open_streams) == 0
        stream.close()
    finally:
        running.close()
