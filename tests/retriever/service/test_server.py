"""The retriever server's life: Describe, health, reflection, index loading (UNAVAILABLE until
loaded, FAILED_PRECONDITION on a tokenizer mismatch), INTERNAL for unexpected errors, idle expiry,
stop, `serve`'s exit codes and `specdraft retriever serve` under SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import specdraft
from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever.drafting.drafter import Drafter
from retriever.service.server import SERVICE_NAME, create_server, load_indexes, serve
from retriever.service.settings import RetrieverSettings
from retriever.store.datastore import write_datastore
from retriever.store.loading import tokenizer_info
from tests.retriever.service.helpers import (
    NOT_SERVING,
    PROMPT,
    SERVING,
    VOCAB,
    Running,
    assert_status,
    best_path,
    cli_server,
    error_of,
    req,
    settings,
    start_cli,
)

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
    caplog.set_level(logging.ERROR, logger="retriever.service.server")
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

    def draft_response(self, tenant, session_id, prompt, new_tokens, max_nodes, prediction=None,
                       verified_nodes=None):
        if tenant == "boom":
            raise RuntimeError("simulated bug")
        return super().draft_response(tenant, session_id, prompt, new_tokens, max_nodes, prediction, verified_nodes)


def test_unexpected_errors_are_internal_logged_and_the_server_lives_on(caplog):
    s = settings()
    caplog.set_level(logging.ERROR, logger="retriever.service.servicer")
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
        records = [r for r in caplog.records if r.name == "retriever.service.servicer"]
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
