"""The retriever gRPC shell end to end: real grpc.aio servers (`create_server`) on free loopback
ports over a real corpus datastore, real stubs. Every status path (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, UNAVAILABLE, FAILED_PRECONDITION via a tokenizer mismatch, INTERNAL),
DraftStream, DraftBatch, EndSession and tenant isolation, Describe, health, reflection, idle
expiry, `serve`'s exit codes and `specdraft retriever serve` under SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import specdraft
from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever.datastore import write_datastore
from retriever.drafter import Drafter, Source
from retriever.server import SERVICE_NAME, create_server, load_indexes, serve, tokenizer_info
from retriever.settings import RetrieverSettings

VOCAB = 1000
PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]  # period 5: the context source continues it
CORPUS_RUN = [300, 301, 302, 303, 304, 305, 306]  # only in the corpus
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parents[1]


def make_tokenizer(path: Path, vocab: int) -> Path:
    """A real word-level tokenizer.json with `vocab` ids (its bytes, hence sha256, depend on vocab)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path.mkdir(parents=True, exist_ok=True)
    Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(corpus datastore dir, its tokenizer dir, another tokenizer dir)."""
    root = tmp_path_factory.mktemp("retriever")
    toy = make_tokenizer(root / "toy", VOCAB)
    docs = [np.array(CORPUS_RUN * 3, np.int32), np.arange(400, 460, dtype=np.int32)]
    write_datastore(root / "corpus", docs, tokenizer_info(str(toy)), "toy-corpus", ["tests"])
    return root / "corpus", toy, make_tokenizer(root / "other", VOCAB + 1)


def settings(**changes) -> RetrieverSettings:
    base = dict(host="127.0.0.1", port=0, output_log="off", default_max_nodes=8, max_nodes_cap=16, max_new_tokens=64,
                max_context_tokens=4096, max_batch=4)
    return RetrieverSettings(**{**base, **changes})


class Running:
    """A started server, a channel and the stubs; `close()` stops both."""

    def __init__(self, s: RetrieverSettings, **kwargs) -> None:
        self.settings = s
        self.server, self.port = create_server(s, **kwargs)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RetrieverStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def health_of(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.channel.close()
        assert self.server.stop(0).wait(10)


@pytest.fixture(scope="module")
def srv(data):
    corpus, toy, _ = data
    running = Running(settings(indexes=(str(corpus),), tokenizer=str(toy), reflection=True))
    assert running.server.wait_ready(30)
    yield running
    running.close()


@pytest.fixture()
def stub(srv):
    return srv.stub


def req(tenant="t", session_id="s", prompt=(), new_tokens=(), max_nodes=0) -> pb.DraftRequest:
    return pb.DraftRequest(tenant=tenant, session_id=session_id, prompt=list(prompt), new_tokens=list(new_tokens),
                           max_nodes=max_nodes)


def error_of(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, details: str) -> None:
    assert (error.code(), error.details()) == (code, details)


def best_path(tree: pb.DraftTree) -> list[int]:
    """Tokens of the chain through the first child of each node, from the root."""
    path, parent = [], -1
    for i, (token, p) in enumerate(zip(tree.token_ids, tree.parents)):
        if p == parent:
            path.append(token)
            parent = i
    return path


# ---------------------------------------------------------------- Draft


def test_draft_continues_the_context_and_the_corpus(stub):
    r = stub.Draft(req(session_id="ok", prompt=PROMPT, max_nodes=4), timeout=5)
    assert r.context_tokens == len(PROMPT) and not r.HasField("error")
    assert best_path(r.tree) == [7, 8, 9, 5] and len(r.tree.token_ids) == 4
    assert list(r.tree.parents) == [-1, 0, 1, 2] and list(r.tree.sources) == [Source.CONTEXT] * 4
    assert list(r.tree.scores) == sorted(r.tree.scores, reverse=True)
    step = stub.Draft(req(session_id="ok", new_tokens=[7, 8]), timeout=5)
    assert step.context_tokens == len(PROMPT) + 2 and best_path(step.tree)[:2] == [9, 5]
    assert len(step.tree.token_ids) <= 8  # max_nodes 0: the default
    corpus = stub.Draft(req(session_id="corpus", prompt=[1, 2, 300, 301, 302]), timeout=5)
    # a fresh tenant scores by the calibration prior: corpus chains fade after a few nodes
    assert best_path(corpus.tree)[:3] == [303, 304, 305]
    assert corpus.tree.sources[0] == pb.SOURCE_CORPUS


@pytest.mark.parametrize("request_, details", [
    (req(prompt=[1, 2, 3, VOCAB]), f"prompt[3] must be a token id in [0, {VOCAB}), got {VOCAB}"),
    (req(prompt=[1, 2, 3, -5]), f"prompt[3] must be a token id in [0, {VOCAB}), got -5"),
    (req(prompt=[1], new_tokens=[4, -1]), f"new_tokens[1] must be a token id in [0, {VOCAB}), got -1"),
    (req(prompt=list(range(40)) + [2**31 - 1]), f"prompt[40] must be a token id in [0, {VOCAB}), got 2147483647"),
    (req(tenant="", prompt=[1]), "tenant must be non-empty, got ''"),
    (req(tenant="x" * 129, prompt=[1]), "tenant must be at most 128 bytes of UTF-8, got 129 bytes"),
    (req(tenant="é" * 65, prompt=[1]), "tenant must be at most 128 bytes of UTF-8, got 130 bytes"),
    (req(session_id="", prompt=[1]), "session_id must be non-empty, got ''"),
    (req(session_id="s" * 200, prompt=[1]), "session_id must be at most 128 bytes of UTF-8, got 200 bytes"),
    (req(prompt=[1], max_nodes=100), "max_nodes must be at most 16, got 100"),
    (req(prompt=[1] * 4097), "prompt must be at most 4096 tokens, got 4097"),
    (req(prompt=[1], new_tokens=[1] * 65), "new_tokens must be at most 64 tokens, got 65"),
    (req(), "prompt or new_tokens must be non-empty, got neither"),
])
def test_draft_rejects_invalid_requests(stub, request_, details):
    assert_status(error_of(stub.Draft, request_), grpc.StatusCode.INVALID_ARGUMENT, details)


def test_tenant_of_exactly_128_bytes_is_accepted(stub):
    assert stub.Draft(req(tenant="é" * 64, prompt=[1, 2]), timeout=5).context_tokens == 2


def test_unknown_session_is_not_found_then_a_resend_with_the_prompt_works(stub):
    e = error_of(stub.Draft, req(session_id="ghost", new_tokens=[7]))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "unknown session 'ghost'" in e.details()
    r = stub.Draft(req(session_id="ghost", prompt=PROMPT, new_tokens=[7]), timeout=5)
    assert r.context_tokens == len(PROMPT) + 1 and best_path(r.tree)[:2] == [8, 9]
    assert stub.Draft(req(session_id="ghost", new_tokens=[8]), timeout=5).context_tokens == len(PROMPT) + 2


def test_context_past_the_limit_is_resource_exhausted(stub):
    stub.Draft(req(session_id="full", prompt=[1] * 4096), timeout=5)
    e = error_of(stub.Draft, req(session_id="full", new_tokens=[2]))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096" in e.details() and "4097" in e.details()


# ---------------------------------------------------------------- DraftStream


def test_draft_stream_answers_each_step_in_order(stub):
    steps = [req(session_id="st", prompt=PROMPT, max_nodes=3), req(session_id="st", new_tokens=[7, 8, 9]),
             req(session_id="st", new_tokens=[5]), req(session_id="st", new_tokens=[6, 7], max_nodes=1)]
    responses = list(stub.DraftStream(iter(steps), timeout=5))
    assert [r.context_tokens for r in responses] == [12, 15, 16, 18]
    assert [best_path(r.tree) for r in responses] == [[7, 8, 9], [5, 6, 7, 8, 9, 5, 6, 7], [6, 7, 8, 9, 5, 6, 7, 8],
                                                      [8]]


def test_draft_stream_steps_wait_for_their_requests(stub):
    """Interactive use: each request is sent only after the previous response arrived."""
    import queue

    outbox: queue.Queue = queue.Queue()
    responses = stub.DraftStream(iter(outbox.get, None), timeout=5)
    outbox.put(req(session_id="live", prompt=PROMPT, max_nodes=2))
    assert best_path(next(responses).tree) == [7, 8]
    outbox.put(req(session_id="live", new_tokens=[7, 8]))
    assert next(responses).context_tokens == len(PROMPT) + 2
    outbox.put(None)
    assert list(responses) == []


def test_draft_stream_error_ends_the_stream_with_its_status(stub):
    steps = [req(session_id="bad", prompt=PROMPT), req(session_id="bad", new_tokens=[7]),
             req(session_id="bad", new_tokens=[VOCAB + 5]), req(session_id="bad", new_tokens=[8])]
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for r in stub.DraftStream(iter(steps), timeout=5):
            got.append(r.context_tokens)
    assert got == [12, 13]
    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT,
                  f"new_tokens[0] must be a token id in [0, {VOCAB}), got {VOCAB + 5}")
    assert stub.Draft(req(session_id="bad", new_tokens=[8]), timeout=5).context_tokens == 14  # not applied


# ---------------------------------------------------------------- DraftBatch


def test_draft_batch_reports_errors_per_item(stub):
    batch = pb.DraftBatchRequest(requests=[
        req(session_id="b1", prompt=PROMPT, max_nodes=2), req(session_id="nobody", new_tokens=[1]),
        req(session_id="b2", prompt=[1, VOCAB]), req(session_id="b1", new_tokens=[7])])
    r = stub.DraftBatch(batch, timeout=5).responses
    assert len(r) == 4
    assert best_path(r[0].tree) == [7, 8] and r[0].context_tokens == 12 and not r[0].HasField("error")
    assert r[1].error.code == grpc.StatusCode.NOT_FOUND.value[0] == 5 and "'nobody'" in r[1].error.message
    assert len(r[1].tree.token_ids) == 0 and r[1].context_tokens == 0
    assert (r[2].error.code, r[2].error.message) == (3, f"prompt[1] must be a token id in [0, {VOCAB}), got {VOCAB}")
    assert r[3].context_tokens == 13 and not r[3].HasField("error")  # items run in order


@pytest.mark.parametrize("n", [0, 5])
def test_draft_batch_of_bad_size_fails_whole(stub, n):
    batch = pb.DraftBatchRequest(requests=[req(session_id=f"z{i}", prompt=[1]) for i in range(n)])
    assert_status(error_of(stub.DraftBatch, batch), grpc.StatusCode.INVALID_ARGUMENT,
                  f"requests must hold 1 to 4 drafts, got {n}")
    if n:  # nothing ran: the sessions do not exist
        assert error_of(stub.Draft, req(session_id="z0", new_tokens=[1])).code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- EndSession


def test_ended_output_drafts_for_the_same_tenant_only(stub):
    output = [10, 11, 12, 13, 14, 15, 16, 17]
    stub.Draft(req(tenant="acme", session_id="gen1", prompt=[900, 901]), timeout=5)
    stub.Draft(req(tenant="acme", session_id="gen1", new_tokens=output), timeout=5)
    ended = stub.EndSession(pb.EndSessionRequest(tenant="acme", session_id="gen1"), timeout=5)
    assert ended.output_tokens == len(output)
    same = stub.Draft(req(tenant="acme", session_id="gen2", prompt=[50, 10, 11, 12]), timeout=5).tree
    assert best_path(same)[:5] == [13, 14, 15, 16, 17] and set(same.sources) == {pb.SOURCE_TENANT}
    other = stub.Draft(req(tenant="umbrella", session_id="gen2", prompt=[50, 10, 11, 12]), timeout=5).tree
    assert 13 not in other.token_ids and pb.SOURCE_TENANT not in other.sources
    e = error_of(stub.EndSession, pb.EndSessionRequest(tenant="acme", session_id="gen1"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "'gen1'" in e.details()
    assert error_of(stub.Draft, req(tenant="acme", session_id="gen1", new_tokens=[1])).code() == \
        grpc.StatusCode.NOT_FOUND


def test_end_session_reports_its_new_tokens_and_hands_them_over(stub):
    stub.Draft(req(tenant="acme", session_id="last", prompt=[900, 901]), timeout=5)
    stub.Draft(req(tenant="acme", session_id="last", new_tokens=[20, 21, 22]), timeout=5)
    ended = stub.EndSession(pb.EndSessionRequest(tenant="acme", session_id="last", new_tokens=[23, 24, 25]), timeout=5)
    assert ended.output_tokens == 6  # the drafts' 3 and the end's 3
    later = stub.Draft(req(tenant="acme", session_id="next", prompt=[7, 22, 23]), timeout=5).tree
    assert best_path(later)[:2] == [24, 25] and set(later.sources) == {pb.SOURCE_TENANT}
    e = error_of(stub.EndSession, pb.EndSessionRequest(tenant="acme", session_id="ghost", new_tokens=[1]))
    assert (e.code(), e.details()) == (grpc.StatusCode.NOT_FOUND,
                                       "session must exist to be ended, got unknown session 'ghost'")


def test_end_session_validates_names(stub):
    assert_status(error_of(stub.EndSession, pb.EndSessionRequest(tenant="", session_id="s")),
                  grpc.StatusCode.INVALID_ARGUMENT, "tenant must be non-empty, got ''")
    assert_status(error_of(stub.EndSession, pb.EndSessionRequest(tenant="t", session_id="é" * 100)),
                  grpc.StatusCode.INVALID_ARGUMENT, "session_id must be at most 128 bytes of UTF-8, got 200 bytes")


# ---------------------------------------------------------------- Describe, health, reflection


def test_describe_reports_version_indexes_limits_and_ready(srv, data):
    corpus, toy, _ = data
    d = srv.stub.Describe(pb.DescribeRequest(), timeout=5)
    assert d.version == specdraft.__version__ and d.ready
    info = tokenizer_info(str(toy))
    assert [(i.name, i.kind, i.tokens, i.documents, i.tokenizer_name, i.tokenizer_sha256, i.vocab_size, i.path)
            for i in d.indexes] == [("toy-corpus", "suffix_array", 81, 2, "toy", info.sha256, VOCAB, str(corpus))]
    assert d.limits == pb.Limits(default_max_nodes=8, max_nodes_cap=16, vocab_size=VOCAB, max_context_tokens=4096,
                                 max_new_tokens=64, max_batch=4, max_sessions=100_000, tenant_token_budget=2_000_000)


def test_health_is_serving_once_loaded(srv):
    assert srv.health_of("") == SERVING and srv.health_of(SERVICE_NAME) == SERVING == srv.health_of(
        "specdraft.v1.Retriever")


def list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return sorted(s.name for s in next(answers).list_services_response.service)


def test_reflection_lists_the_services_when_enabled(srv):
    assert list_services(srv.channel) == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                          "specdraft.v1.Retriever"]


class Gate:
    """A loader that waits for `open()` before loading the indexes for real."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, s: RetrieverSettings):
        assert self.event.wait(30)
        return load_indexes(s)


def test_unavailable_and_not_serving_until_the_indexes_load(data):
    gate = Gate()
    running = Running(settings(indexes=(str(data[0]),)), loader=gate)
    try:
        assert running.health_of("") == NOT_SERVING and running.health_of(SERVICE_NAME) == NOT_SERVING
        for call, request in [(running.stub.Draft, req(prompt=[1])),
                              (running.stub.DraftBatch, pb.DraftBatchRequest(requests=[req(prompt=[1])])),
                              (running.stub.EndSession, pb.EndSessionRequest(tenant="t", session_id="s"))]:
            assert_status(error_of(call, request), grpc.StatusCode.UNAVAILABLE, "indexes are still loading")
        stream = running.stub.DraftStream(iter([req(prompt=[1])]), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert_status(info.value, grpc.StatusCode.UNAVAILABLE, "indexes are still loading")
        d = running.stub.Describe(pb.DescribeRequest(), timeout=5)
        assert not d.ready and len(d.indexes) == 0 and d.limits.vocab_size == 0
        assert not running.server.wait_ready(0.2)
        gate.event.set()
        assert running.server.wait_ready(30)
        assert running.health_of("") == SERVING and running.health_of(SERVICE_NAME) == SERVING
        assert running.stub.Draft(req(prompt=PROMPT, max_nodes=2), timeout=5).context_tokens == len(PROMPT)
        d = running.stub.Describe(pb.DescribeRequest(), timeout=5)
        assert d.ready and len(d.indexes) == 1 and d.limits.vocab_size == VOCAB
        e = error_of(lambda r, timeout: list_services(running.channel), None)  # reflection is off by default
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        gate.event.set()
        running.close()


def test_health_watch_sees_the_switch_to_serving():
    gate = Gate()
    running = Running(settings(), loader=gate)
    try:
        watch = running.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert next(watch).status == NOT_SERVING
        gate.event.set()
        assert next(watch).status == SERVING
        watch.cancel()
    finally:
        gate.event.set()
        running.close()


def test_load_failure_keeps_not_serving_and_answers_unavailable(tmp_path, caplog):
    missing = tmp_path / "nope"
    caplog.set_level(logging.ERROR, logger="retriever.server")
    running = Running(settings(indexes=(str(missing),)))
    try:
        assert not running.server.wait_ready(30)
        assert running.health_of("") == NOT_SERVING and running.health_of(SERVICE_NAME) == NOT_SERVING
        e = error_of(running.stub.Draft, req(prompt=[1]))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert e.details() == f"indexes failed to load: index {missing} must be a directory, got no such path"
        assert not running.stub.Describe(pb.DescribeRequest(), timeout=5).ready
        assert any("failed to load" in r.getMessage() for r in caplog.records)
    finally:
        running.close()


def test_tokenizer_mismatch_fails_the_load(data):
    corpus, _, other = data
    running = Running(settings(indexes=(str(corpus),), tokenizer=str(other / "tokenizer.json")))
    try:
        assert not running.server.wait_ready(30)
        e = error_of(running.stub.Draft, req(prompt=[1]))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert e.details().startswith(f"indexes failed to load: index {corpus} tokenizer must be other")
    finally:
        running.close()


def test_unreadable_tokenizer_or_indexes_of_two_tokenizers_fail_the_load(data, tmp_path):
    corpus, _, other = data
    second = tmp_path / "second"
    write_datastore(second, [np.arange(10, dtype=np.int32)], tokenizer_info(str(other)), "second")
    for s, details in [
        (settings(indexes=(str(corpus),), tokenizer=str(tmp_path / "none")),
         f"indexes failed to load: tokenizer {tmp_path / 'none'} must be a tokenizer.json file or a directory "
         "holding one, got no such path"),
        (settings(indexes=(str(corpus), str(second))),
         f"indexes failed to load: indexes must share one tokenizer, got {corpus} with toy"),
    ]:
        running = Running(s)
        try:
            assert not running.server.wait_ready(30)
            e = error_of(running.stub.Draft, req(prompt=[1]))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details().startswith(details), e.details()
        finally:
            running.close()


def test_explicit_vocab_size_wins_over_the_indexes(data):
    running = Running(settings(indexes=(str(data[0]),), vocab_size=50))
    try:
        assert running.server.wait_ready(30)
        assert_status(error_of(running.stub.Draft, req(prompt=[49, 50])), grpc.StatusCode.INVALID_ARGUMENT,
                      "prompt[1] must be a token id in [0, 50), got 50")
        assert running.stub.Describe(pb.DescribeRequest(), timeout=5).limits.vocab_size == 50
    finally:
        running.close()


def test_without_indexes_any_24_bit_id_goes():
    running = Running(settings())
    try:
        assert running.server.wait_ready(30)
        assert running.stub.Draft(req(prompt=[16_777_213]), timeout=5).context_tokens == 1
        assert_status(error_of(running.stub.Draft, req(prompt=[16_777_214])), grpc.StatusCode.INVALID_ARGUMENT,
                      "prompt[0] must be a token id in [0, 16777214), got 16777214")
        d = running.stub.Describe(pb.DescribeRequest(), timeout=5)
        assert d.ready and d.limits.vocab_size == 0 and len(d.indexes) == 0
    finally:
        running.close()


# ---------------------------------------------------------------- faults, expiry, stop


class FaultyDrafter(Drafter):
    """A real Drafter that fails unexpectedly for tenant "boom" (a bug stand-in)."""

    def draft_response(self, tenant, session_id, prompt, new_tokens, max_nodes):
        if tenant == "boom":
            raise RuntimeError("simulated bug")
        return super().draft_response(tenant, session_id, prompt, new_tokens, max_nodes)


def test_unexpected_errors_are_internal_logged_and_the_server_lives_on(caplog):
    s = settings()
    caplog.set_level(logging.ERROR, logger="retriever.service")
    running = Running(s, drafter=FaultyDrafter(s.drafter_config()))
    try:
        assert running.server.wait_ready(30)
        secret = [4242, 4243, 4244]
        assert_status(error_of(running.stub.Draft, req(tenant="boom", prompt=secret)), grpc.StatusCode.INTERNAL,
                      "internal error (RuntimeError), see the retriever's log")
        batch = running.stub.DraftBatch(pb.DraftBatchRequest(requests=[req(tenant="boom", prompt=[1]),
                                                                       req(prompt=PROMPT, max_nodes=1)]), timeout=5)
        assert batch.responses[0].error.code == grpc.StatusCode.INTERNAL.value[0]
        assert best_path(batch.responses[1].tree) == [7]
        records = [r for r in caplog.records if r.name == "retriever.service"]
        assert len(records) == 2 and "RuntimeError" in records[0].getMessage()
        assert not any("4242" in r.getMessage() for r in records)  # request contents stay out of the log
        assert running.stub.Draft(req(prompt=PROMPT, max_nodes=1), timeout=5).context_tokens == len(PROMPT)
    finally:
        running.close()


def test_idle_sessions_are_ended_and_their_output_goes_to_the_tenant():
    running = Running(settings(session_idle_s=0.05, expire_interval_s=0.05))
    try:
        assert running.server.wait_ready(30)
        running.stub.Draft(req(session_id="idle", prompt=[900], new_tokens=[20, 21, 22, 23]), timeout=5)
        deadline = time.monotonic() + 10
        while True:
            tree = running.stub.Draft(req(session_id="probe", prompt=[20, 21]), timeout=5).tree
            if best_path(tree)[:2] == [22, 23] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert best_path(tree)[:2] == [22, 23] and tree.sources[0] == pb.SOURCE_TENANT
        assert error_of(running.stub.Draft, req(session_id="idle", new_tokens=[1])).code() == \
            grpc.StatusCode.NOT_FOUND
    finally:
        running.close()


def test_stop_ends_the_server_and_frees_the_port():
    running = Running(settings())
    assert running.server.wait_ready(30)
    port = running.port
    assert running.server.wait_for_termination(0.01)  # True: timed out, still running
    event = running.server.stop(1.0)
    assert event.wait(10) and running.server.stop(0) is event
    assert not running.server.wait_for_termination(0)
    running.channel.close()
    again = Running(settings(port=port))  # the port can be bound again
    try:
        assert again.port == port and again.server.wait_ready(30)
    finally:
        again.close()


def test_stop_turns_health_not_serving_before_the_grace_period():
    running = Running(settings())
    try:
        assert running.server.wait_ready(30)
        watch = running.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == SERVING
        t0 = time.monotonic()
        running.server.stop(2.0)
        assert next(watch).status == NOT_SERVING and time.monotonic() - t0 < 1.0
        watch.cancel()
    finally:
        running.close()


def test_bind_failure_is_an_os_error():
    first = Running(settings())
    try:
        with pytest.raises(OSError, match=f"retriever address must be bindable, got 127.0.0.1:{first.port}"):
            create_server(settings(port=first.port))
    finally:
        first.close()


# ---------------------------------------------------------------- serve, the CLI


def test_serve_returns_1_when_the_indexes_fail_to_load(tmp_path):
    assert asyncio.run(asyncio.wait_for(serve(settings(indexes=(str(tmp_path / "none"),))), 30)) == 1


def start_cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "specdraft.cli", "retriever", "serve", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


@contextlib.contextmanager
def cli_server(*args: str, **env: str) -> Iterator[subprocess.Popen]:
    """`start_cli`, killed (if still running) and its pipes closed on exit."""
    proc = start_cli(*args, **env)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_cli_serves_until_sigterm(data):
    corpus, toy, _ = data
    with cli_server("--port", "0", "--index", str(corpus), "--tokenizer", str(toy), "--max-nodes", "5",
                    "--reflection", SPECDRAFT_HOST="127.0.0.1", SPECDRAFT_MAX_BATCH="7", SPECDRAFT_PORT="1") as proc:
        line = proc.stdout.readline()
        assert line.startswith("retriever listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        target = line.split()[-1]
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            d = pb_grpc.RetrieverStub(channel).Describe(pb.DescribeRequest(), timeout=5)
            assert (d.limits.default_max_nodes, d.limits.max_nodes_cap, d.limits.max_batch) == (5, 5, 7)
            assert [i.name for i in d.indexes] == ["toy-corpus"]
            assert "specdraft.v1.Retriever" in list_services(channel)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("args, env, code, message", [
    (["--port", "0", "--index", "/nonexistent/index"], {}, 1, "failed to load"),
    (["--port", "70000"], {}, 2, "SPECDRAFT_PORT must be an integer in [0, 65535], got 70000"),
    (["--port", "0"], {"SPECDRAFT_SESSION_IDLE_S": "soon"}, 2, "SPECDRAFT_SESSION_IDLE_S must be a number, got 'soon'"),
])
def test_cli_exit_codes(args, env, code, message):
    proc = start_cli(*args, SPECDRAFT_HOST="127.0.0.1", **env)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code and message in err, err


@pytest.mark.parametrize("seed", range(6))
def test_draft_response_is_the_draft_serialized_by_protobuf(seed):
    """Twin drafters step for step on random sessions: the core's DraftResponse bytes equal protobuf's
    serialization of the arrays `draft` returns (empty trees, -1 parents and long trees included)."""
    from retriever.drafter import Drafter

    rng = np.random.default_rng(seed)
    s = settings(max_nodes_cap=256)
    arrays, wire = Drafter(s.drafter_config()), Drafter(s.drafter_config())
    for session in range(4):
        vocab = int(rng.integers(3, 40)) if session < 3 else 2**24 - 2  # a huge vocabulary: no repeats, empty trees
        prompt = rng.integers(0, vocab, int(rng.integers(1, 200))).astype(np.int32)
        new = np.empty(0, np.int32)
        for step in range(12):
            max_nodes = int(rng.integers(1, 257))
            first = prompt if step == 0 else None
            result = arrays.draft("t", str(session), first, new, max_nodes)
            got = wire.draft_response("t", str(session), first, new, max_nodes)
            t = result.tree
            want = pb.DraftResponse(tree=pb.DraftTree(token_ids=t.token_ids.tolist(), parents=t.parents.tolist(),
                                                      scores=t.scores.tolist(), sources=t.sources.tolist()),
                                    context_tokens=result.context_tokens)
            want.tree.SetInParent()  # present even when empty
            assert got.response == want.SerializeToString() and got.nodes == len(t)
            new = rng.integers(0, vocab, int(rng.integers(0, 6))).astype(np.int32)
            if not len(new):
                new = t.token_ids[:1].copy() if len(t) else np.array([1], np.int32)


def test_encode_batch_is_the_serialized_batch_response():
    from retriever.wire import encode_batch

    rng = np.random.default_rng(3)
    for n in (1, 2, 7):
        items = [pb.DraftResponse(tree=pb.DraftTree(token_ids=rng.integers(0, 2**24, k).tolist(),
                                                    parents=[-1] * k), context_tokens=k)
                 if k else pb.DraftResponse(error=pb.DraftError(code=5, message="x" * 300))
                 for k in rng.integers(0, 100, n)]  # lengths of one and two varint bytes
        assert encode_batch([r.SerializeToString() for r in items]) == pb.DraftBatchResponse(
            responses=items).SerializeToString()
