"""Prometheus metrics and JSON logs of the retriever, against a real server (gRPC on a free port,
/metrics on another). Counters move by exactly what the calls did; names and types follow the
Prometheus conventions (`tests.metrics_scrape`); JSON log lines parse and never hold prompt text."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever.logs import JsonFormatter
from retriever.service.server import create_server
from retriever.service.settings import RetrieverSettings
from retriever.store.datastore import write_datastore
from retriever.store.loading import tokenizer_info
from tests.metrics_scrape import check_conventions, scrape, value
from tests.retriever.service.helpers import loopback_settings, make_tokenizer, start_cli

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]




# ---------------------------------------------------------------- retriever


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    toy = make_tokenizer(root / "toy", 1000)
    docs = [np.array([300, 301, 302, 303] * 3, np.int32)]
    write_datastore(root / "corpus", docs, tokenizer_info(str(toy)), "toy-corpus", ["tests"])
    return root


@pytest.fixture(scope="module")
def retriever(corpus):
    s = loopback_settings(metrics_port=0, output_log="file", data_dir=str(corpus / "data"),
                          indexes=(str(corpus / "corpus"),), max_batch=2, default_max_nodes=8, max_nodes_cap=8)
    server, port = create_server(s)
    assert server.wait_ready(10)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, pb_grpc.RetrieverStub(channel)
    server.stop(0).wait()


def _rejects(call, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code


def test_retriever_metrics_count_the_calls(retriever):
    server, stub = retriever
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = scrape(url)
    nodes = len(stub.Draft(pb.DraftRequest(tenant="t", session_id="a", prompt=PROMPT)).tree.token_ids)
    nodes += len(stub.Draft(pb.DraftRequest(tenant="t", session_id="a", new_tokens=[7, 8, 9])).tree.token_ids)
    _rejects(lambda: stub.Draft(pb.DraftRequest(tenant="t", session_id="a", new_tokens=[5000])),
             grpc.StatusCode.INVALID_ARGUMENT)
    _rejects(lambda: stub.Draft(pb.DraftRequest(tenant="t", session_id="zz", new_tokens=[1])), grpc.StatusCode.NOT_FOUND)
    stream = list(stub.DraftStream(iter([pb.DraftRequest(tenant="t", session_id="b", prompt=PROMPT),
                                         pb.DraftRequest(tenant="t", session_id="b", new_tokens=[7, 8])])))
    batch = stub.DraftBatch(pb.DraftBatchRequest(requests=[pb.DraftRequest(tenant="t", session_id="c", prompt=PROMPT),
                                                           pb.DraftRequest(tenant="t", session_id="d", new_tokens=[1])]))
    _rejects(lambda: stub.DraftBatch(pb.DraftBatchRequest(requests=[pb.DraftRequest()] * 3)),
             grpc.StatusCode.INVALID_ARGUMENT)
    stub.EndSession(pb.EndSessionRequest(tenant="t", session_id="a"))
    after = scrape(url)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert {(rpc, code): delta("specdraft_retriever_drafts_total", rpc=rpc, code=code) for rpc, code in
            [("draft", "OK"), ("draft", "INVALID_ARGUMENT"), ("draft", "NOT_FOUND"), ("stream", "OK"),
             ("batch", "OK"), ("batch", "NOT_FOUND")]} == {
        ("draft", "OK"): 2, ("draft", "INVALID_ARGUMENT"): 1, ("draft", "NOT_FOUND"): 1, ("stream", "OK"): 2,
        ("batch", "OK"): 1, ("batch", "NOT_FOUND"): 1}
    assert delta("specdraft_retriever_draft_nodes_total", rpc="draft") == nodes > 0
    assert delta("specdraft_retriever_draft_nodes_total", rpc="stream") == sum(len(r.tree.token_ids) for r in stream)
    assert delta("specdraft_retriever_draft_nodes_total", rpc="batch") == len(batch.responses[0].tree.token_ids)
    assert delta("specdraft_retriever_new_tokens_total", rpc="draft") == 3
    assert delta("specdraft_retriever_new_tokens_total", rpc="stream") == 2
    assert delta("specdraft_retriever_session_starts_total", rpc="stream") == 1
    assert delta("specdraft_retriever_draft_duration_seconds_count", rpc="draft") == 2
    assert delta("specdraft_retriever_draft_duration_seconds_bucket", rpc="draft", le="+Inf") == 2
    assert 0 < delta("specdraft_retriever_draft_duration_seconds_sum", rpc="draft") < 1
    rejections = {k: v - before.get("specdraft_retriever_rejections", {}).get(k, 0)
                  for k, v in after["specdraft_retriever_rejections"].items()}
    assert {tuple(dict(k[1:]).values()): v for k, v in rejections.items() if v} == {
        ("INVALID_ARGUMENT", "new_tokens", "draft"): 1, ("NOT_FOUND", "not_found", "draft"): 1,
        ("NOT_FOUND", "not_found", "batch"): 1, ("INVALID_ARGUMENT", "requests", "batch"): 1}
    assert delta("specdraft_retriever_sessions_ended_total", reason="end_session") == 1
    assert value(after, "specdraft_retriever_sessions") == 2  # b and c; a ended, d never started
    assert value(after, "specdraft_retriever_tenants") == 1
    assert value(after, "specdraft_retriever_ready") == 1
    assert value(after, "specdraft_retriever_index_tokens", index="toy-corpus") == 12
    assert value(after, "specdraft_retriever_output_log_warm", backend="file") == 1
    assert value(after, "specdraft_retriever_output_log_read_errors_total", backend="file") == 0
    assert 0 <= value(after, "specdraft_retriever_output_log_since_read_seconds", backend="file") < 10
    check_conventions(url, "specdraft_retriever_")


def test_index_lookup_times_are_sampled_per_source(retriever):
    from retriever.service.metrics import LOOKUP_SAMPLE_EVERY

    server, stub = retriever
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    stub.Draft(pb.DraftRequest(tenant="lk", session_id="seed", prompt=PROMPT))
    stub.Draft(pb.DraftRequest(tenant="lk", session_id="seed", new_tokens=[7, 8, 9]))  # an output to keep
    stub.EndSession(pb.EndSessionRequest(tenant="lk", session_id="seed"))  # the tenant index now exists
    before = scrape(url)
    stub.Draft(pb.DraftRequest(tenant="lk", session_id="lookups", prompt=PROMPT))
    for _ in range(2 * LOOKUP_SAMPLE_EVERY - 1):
        stub.Draft(pb.DraftRequest(tenant="lk", session_id="lookups", new_tokens=[7]))
    after = scrape(url)
    sample = "specdraft_retriever_index_lookup_seconds_count"
    counts = {source: value(after, sample, source=source) - value(before, sample, source=source)
              for source in ("context", "tenant", "corpus:toy-corpus", "build_tree")}
    assert counts == {source: 2 for source in counts}  # any 2 * LOOKUP_SAMPLE_EVERY drafts in a row: 2 sampled
    assert 0 < value(after, "specdraft_retriever_index_lookup_seconds_sum", source="corpus:toy-corpus") < 1


def test_drafter_reports_each_lookup_in_call_order(corpus):
    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import DrafterConfig
    from retriever.store.datastore import open_datastore

    drafter = Drafter(DrafterConfig(), [open_datastore(corpus / "corpus")])
    fresh: list = []  # the lookups are per thread: a thread that never drafted has none
    thread = threading.Thread(target=lambda: fresh.append(drafter.last_lookup_s()))
    thread.start()
    thread.join()
    assert fresh == [()]
    prompt = np.array(PROMPT, np.int32)
    drafter.draft("t", "s", prompt, np.empty(0, np.int32), 8)
    assert [label for label, _ in drafter.last_lookup_s()] == ["context", "corpus:toy-corpus", "build_tree"]
    drafter.draft("t", "s", None, np.array([7, 8, 9], np.int32), 8)
    drafter.end_session("t", "s")  # now the tenant has a prior output to query
    drafter.draft("t", "s2", prompt, np.empty(0, np.int32), 8)
    lookups = drafter.last_lookup_s()
    assert [label for label, _ in lookups] == ["context", "tenant", "corpus:toy-corpus", "build_tree"]
    assert all(0 < seconds < 1 for _, seconds in lookups)


def test_retriever_metrics_endpoint_answers_only_get_metrics(retriever):
    server, _ = retriever
    base = f"http://127.0.0.1:{server.metrics_port}"
    for path, method, status in [("/", "GET", 404), ("/metrics", "POST", 405)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(base + path, method=method, data=b"" if method == "POST"
                                                          else None), timeout=10)
        assert e.value.code == status


def test_retriever_metrics_port_setting():
    assert RetrieverSettings().metrics_port == -1
    assert RetrieverSettings.from_env({"SPECDRAFT_METRICS_PORT": "9464"}).metrics_port == 9464
    with pytest.raises(ValueError, match=r"SPECDRAFT_METRICS_PORT must be an integer in \[-1, 65535\]"):
        RetrieverSettings(metrics_port=-2)
    server, _ = create_server(RetrieverSettings(host="127.0.0.1", port=0, output_log="off"))
    try:
        assert server.metrics_port is None
    finally:
        server.stop(0).wait()


def test_retriever_cli_logs_json_lines_and_serves_metrics(corpus):
    proc = start_cli("--port", "0", "--metrics-port", "0", "--output-log", "off", "--log-format", "json",
                     SPECDRAFT_HOST="127.0.0.1", SPECDRAFT_INDEX_DIRS=str(corpus / "corpus"))
    try:
        target = proc.stdout.readline().split()[-1]
        lines = [json.loads(proc.stderr.readline())]  # start-up lines (listening, auth, ...) up to the metrics one
        while "/metrics" not in lines[-1]["msg"] and len(lines) < 10:
            lines.append(json.loads(proc.stderr.readline()))
        url = re.search(r"http://\S+/metrics", lines[-1]["msg"]).group(0)
        assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
        with grpc.insecure_channel(target) as channel:
            deadline = time.monotonic() + 30
            while True:
                try:
                    pb_grpc.RetrieverStub(channel).Draft(pb.DraftRequest(tenant="t", session_id="s", prompt=PROMPT),
                                                         timeout=5)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.05)
        assert value(scrape(url), "specdraft_retriever_drafts_total", rpc="draft", code="OK") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = proc.stderr.read().splitlines()
        assert rest and all(json.loads(line)["logger"] for line in rest)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ---------------------------------------------------------------- JSON logs


def test_json_formatter_lines_parse_with_extra_fields_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("drafted %d nodes", 3, extra={"rpc": "draft", "nodes": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "drafted 3 nodes" and first["level"] == "WARNING" and first["logger"] == "tests.json"
    assert (first["rpc"], first["nodes"]) == ("draft", 3) and first["ts"].endswith("+00:00")
    assert second["msg"] == "failed" and "ValueError: boom" in second["exc"]


def test_log_format_from_flag_and_environment():
    from retriever.service.settings import RetrieverSettings
    from verifier.api.settings import VerifierSettings

    for settings in (RetrieverSettings, VerifierSettings):
        assert settings.from_env({}).log_format == "text"
        assert settings.from_env({"SPECDRAFT_LOG_FORMAT": "JSON"}).log_format == "json"
        assert settings.from_env({"SPECDRAFT_LOG_FORMAT": "json"}, log_format="text").log_format == "text"
        with pytest.raises(ValueError, match="SPECDRAFT_(VERIFIER_)?LOG_FORMAT must be one of text, json, got 'xml'"):
            settings.from_env({"SPECDRAFT_LOG_FORMAT": "xml"})


def test_draft_tally_exposes_counters_and_a_cumulative_histogram():
    """The hot path's plain-number tally reads like prometheus_client instruments: le buckets
    count values <= their bound, cumulatively; failures count per code."""
    from retriever.service.metrics import RetrieverMetrics

    m = RetrieverMetrics.create()
    for seconds, nodes, new, started in ((1e-5, 3, 0, True), (3e-5, 0, 2, False), (2.0, 5, 1, False)):
        m.drafted("draft", seconds, nodes, new, started)
    m.draft_failed("stream", "NOT_FOUND", "session must be started with a prompt first, got x")
    value = m.registry.get_sample_value
    assert [value("specdraft_retriever_draft_duration_seconds_bucket", {"rpc": "draft", "le": le})
            for le in ("1e-05", "2.5e-05", "5e-05", "0.01", "+Inf")] == [1, 1, 2, 2, 3]
    assert value("specdraft_retriever_draft_duration_seconds_count", {"rpc": "draft"}) == 3
    assert abs(value("specdraft_retriever_draft_duration_seconds_sum", {"rpc": "draft"}) - 2.00004) < 1e-9
    assert value("specdraft_retriever_drafts_total", {"rpc": "draft", "code": "OK"}) == 3
    assert value("specdraft_retriever_drafts_total", {"rpc": "stream", "code": "NOT_FOUND"}) == 1
    assert value("specdraft_retriever_drafts_total", {"rpc": "batch", "code": "OK"}) == 0
    assert [value(f"specdraft_retriever_{n}_total", {"rpc": "draft"})
            for n in ("draft_nodes", "new_tokens", "session_starts")] == [8, 3, 1]
