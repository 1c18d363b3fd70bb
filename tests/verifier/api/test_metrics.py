"""Prometheus metrics and JSON logs of the verifier over the SmolLM2 model (/metrics of its HTTP
API and of its own port): steps, tokens, accepted tokens by source, rejections, steps without
a draft; JSON log lines never hold prompt text."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest

from retriever.logs import JsonFormatter
from retriever.service.server import create_server
from tests.metrics_scrape import SECRET, check_conventions, scrape, value
from tests.retriever.service.helpers import loopback_settings
from verifier.decoding.stats import source_name


@pytest.fixture(scope="module")
def engine(request):
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    try:
        model = request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        from verifier.api.server import load
        from verifier.api.settings import VerifierSettings

        model = load(VerifierSettings())
    return Engine(model, CostModel.flat())


@pytest.fixture(scope="module")
def json_log():
    """Root-logger records at INFO as JSON lines, for the module's verifier tests."""
    stream, root = io.StringIO(), logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def verifier(engine, json_log):
    """A verifier drafting through a retriever without indexes (any vocabulary)."""
    from verifier.api.server import create_server as create_verifier
    from verifier.api.settings import VerifierSettings

    retriever, retriever_port = create_server(loopback_settings(output_log="off"))
    server, port = create_verifier(VerifierSettings(host="127.0.0.1", port=0, http_port=0, metrics_port=0,
                                                  retriever=f"127.0.0.1:{retriever_port}"), engine=engine)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, channel
    server.stop(0).wait()
    retriever.stop(0).wait()


def _generate(channel, text: str, max_new_tokens: int = 24, **sampling):
    from protos.specdraft.v1 import verifier_pb2 as vpb
    from protos.specdraft.v1 import verifier_pb2_grpc as vpb_grpc

    req = vpb.GenerateRequest(text=text, tenant="tests",
                              sampling=vpb.SamplingParams(max_new_tokens=max_new_tokens, **sampling))
    return list(vpb_grpc.VerifierStub(channel).Generate(req, timeout=120))


def test_verifier_metrics_count_steps_tokens_and_sources(verifier, json_log):
    server, channel = verifier
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    before = scrape(url)
    prompt = f"# {SECRET}\ndef inc(x):\n    return x + 1\n\n\ndef inc(x):\n    return x + 1\n\n\ndef inc(x):\n"
    last = _generate(channel, prompt)[-1]
    after = scrape(url)
    s = last.stats

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    reason = {1: "eos", 2: "length", 3: "stop"}[last.finish_reason]
    assert delta("specdraft_verifier_generations_total", api="grpc", finish_reason=reason) == 1
    assert delta("specdraft_verifier_new_tokens_total", api="grpc") == s.new_tokens
    assert delta("specdraft_verifier_prompt_tokens_total", api="grpc") == s.prompt_tokens
    assert delta("specdraft_verifier_steps_total") == s.steps
    assert delta("specdraft_verifier_draft_nodes_total") == s.draft_nodes
    by_source = {x.source: x.tokens for x in s.accepted_by_source}
    assert {n: delta("specdraft_verifier_accepted_draft_tokens_total", source=source_name(n))
            for n in by_source} == by_source and source_name(1) == "context"
    assert s.accepted_draft_tokens > 0
    assert delta("specdraft_verifier_accepted_draft_tokens_per_step_count") == s.steps
    assert delta("specdraft_verifier_accepted_draft_tokens_per_step_sum") == s.accepted_draft_tokens
    assert delta("specdraft_verifier_draft_duration_seconds_sum") == pytest.approx(s.draft_s, rel=1e-3, abs=1e-6)
    assert delta("specdraft_verifier_verify_duration_seconds_sum") == pytest.approx(s.verify_s, rel=1e-3, abs=1e-6)
    assert delta("specdraft_verifier_generation_tokens_per_second_count") == 1
    assert delta("specdraft_verifier_generation_tokens_per_second_sum") == pytest.approx(s.tokens_per_s, rel=1e-3)
    assert scrape(f"http://127.0.0.1:{server.ports.metrics}/metrics").keys() == after.keys()
    check_conventions(url, "specdraft_verifier_")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert any(x["logger"] == "verifier.api.server" for x in lines)
    assert SECRET not in json_log.getvalue()


def test_verifier_counts_http_generations_and_rejections(verifier, json_log):
    server, channel = verifier
    base = f"http://127.0.0.1:{server.http_port}"
    before = scrape(base + "/metrics")
    body = json.dumps({"prompt": f"{SECRET} says", "max_tokens": 3, "temperature": 0}).encode()
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", data=body, headers={
            "Content-Type": "application/json"}), timeout=120) as r:
        usage = json.loads(r.read())["usage"]
    bad = json.dumps({"prompt": "x", "temperature": -1}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", data=bad, headers={
            "Content-Type": "application/json"}), timeout=60)
    assert e.value.code == 400
    with pytest.raises(grpc.RpcError):
        _generate(channel, "x", temperature=-1)
    after = scrape(base + "/metrics")

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert delta("specdraft_verifier_generations_total", api="http", finish_reason="length") == 1
    assert delta("specdraft_verifier_new_tokens_total", api="http") == usage["completion_tokens"] == 3
    assert delta("specdraft_verifier_rejections_total", api="http", code="400", reason="temperature") == 1
    assert delta("specdraft_verifier_rejections_total", api="grpc", code="INVALID_ARGUMENT",
                 reason="sampling.temperature") == 1
    assert any(json.loads(line)["logger"] == "verifier.api.http_api" for line in json_log.getvalue().splitlines())
    assert SECRET not in json_log.getvalue()


def test_verifier_counts_steps_without_a_draft_when_the_retriever_is_down(engine):
    import socket

    from verifier.api.server import create_server as create_verifier
    from verifier.api.settings import VerifierSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    server, port = create_verifier(VerifierSettings(host="127.0.0.1", port=0, http_port=0, retriever=dead,
                                                  draft_deadline_s=0.02), engine=engine)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            last = _generate(channel, "def f(x):", max_new_tokens=6)[-1]
        after = scrape(f"http://127.0.0.1:{server.http_port}/metrics")
        fallbacks = sum(v for k, v in after.get("specdraft_verifier_draft_fallbacks", {}).items()
                        if k[0].endswith("_total"))
        assert 1 <= fallbacks <= last.stats.steps and last.stats.draft_nodes == 0
    finally:
        server.stop(0).wait()
