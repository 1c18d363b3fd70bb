"""The OpenAI-compatible HTTP API end to end, with the official `openai` client against the real
verifier server (gRPC + HTTP on free loopback ports, drafting through a real retriever, the
SmolLM2 model, a flat cost model): the same greedy text as gRPC Generate, streamed or not,
chat, stop strings, finish reasons, usage, errors in OpenAI's shape, tenants, one shared lock."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from tests.verifier.api.test_service import REPEAT, collect, request
from verifier.api.settings import VerifierSettings

N = 12  # new tokens per generation: short, the machine is shared


@pytest.fixture(scope="module")
def model(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def engine(model):
    """A flat cost model (verify every draft node) keeps drafting independent of the machine's load."""
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    return Engine(model, CostModel.flat())


@pytest.fixture(scope="module")
def server(engine, retriever_target):
    from verifier.api.server import create_server

    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, retriever=retriever_target,
                                               max_new_tokens_cap=512), engine=engine)
    yield server
    server.stop(0).wait()


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as channel:
        yield pb_grpc.VerifierStub(channel)


@pytest.fixture(scope="module")
def grpc_text(stub) -> str:
    return collect(stub, request(max_new_tokens=N))[0]


def _post(base_url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(base_url + path, data=body, headers={"Content-Type": "application/json",
                                                                       **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- completions


def test_completion_equals_grpc_generate_with_usage_and_stats(client, grpc_text, model):
    r = client.completions.create(model="smollm2", prompt=REPEAT, max_tokens=N, temperature=0, user="tests")
    assert r.choices[0].text == grpc_text and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "smollm2"
    prompt_tokens = len(model.tokenizer.encode(REPEAT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, N,
                                                                                       prompt_tokens + N)
    stats = r.model_extra["specdraft"]
    assert stats["steps"] < N and stats["mean_accepted_tokens"] == pytest.approx(N / stats["steps"])
    assert sum(stats["accepted_by_source"].values()) == stats["accepted_draft_tokens"] > 0
    assert stats["tenant"] == "tests"


def test_streamed_completion_of_token_ids_equals_grpc_generate(client, grpc_text, model):
    ids = model.tokenizer.encode(REPEAT)
    chunks = list(client.completions.create(model="smollm2", prompt=ids, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_text
    *text_chunks, final, usage = chunks
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in text_chunks)
    assert final.choices[0].finish_reason == "length" and final.model_extra["specdraft"]["steps"] >= 1
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (len(ids), N)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_stop_string_ends_the_text(client, grpc_text):
    stop = grpc_text[len(grpc_text) // 2:len(grpc_text) // 2 + 3]
    r = client.completions.create(model="smollm2", prompt=[REPEAT], max_tokens=N, temperature=0, stop=stop)
    assert r.choices[0].text == grpc_text[:grpc_text.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < N


def test_raw_sse_framing(base_url):
    body = json.dumps({"prompt": "def f(", "max_tokens": 2, "temperature": 0, "stream": True}).encode()
    status, raw = _post(base_url, "/v1/completions", body)
    events = raw.decode().split("\n\n")
    assert status == 200 and events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------- chat


def test_chat_completion_streamed_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_completion_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


# ---------------------------------------------------------------- errors


def _bad_requests(model) -> list[tuple[dict, str, str]]:
    long_ids = [1] * model.max_positions
    return [
        (dict(temperature=-1), "temperature must be in [0, 100] (0 = greedy), got -1", "temperature"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5", "top_p"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0", "max_tokens"),
        (dict(max_tokens=513), "max_tokens must be at most 512, got 513", "max_tokens"),
        (dict(stop=["ok", ""]), "stop[1] must be 1 to 256 characters, got 0", "stop"),
        (dict(n=2), "n must be null or 1 (not supported), got 2", "n"),
        (dict(logprobs=3), "logprobs must be null or false or 0 (not supported), got 3", "logprobs"),
        (dict(prompt=["a", "b"]), "prompt must be a string, a list of token ids, or a list of one", "prompt"),
        (dict(prompt=""), "prompt must be non-empty", "prompt"),
        (dict(prompt=[1, model.vocab_size]), f"prompt must be a non-empty list of ids in [0, {model.vocab_size})",
         "prompt"),
        (dict(prompt=long_ids), f"prompt must be at most {model.max_positions - 1} tokens for this model", "prompt"),
        (dict(user="t" * 129), "user must be at most 128 bytes, got 129 bytes", "user"),
        (dict(extra_body={"top_k": -5}), "top_k must be >= 0 (0 = off), got -5", "top_k"),
        (dict(extra_body={"temperature": "hot"}), "temperature must be a number, got 'hot'", "temperature"),
    ]


def test_bad_parameters_are_400_with_the_rule(client, model):
    for kwargs, message, param in _bad_requests(model):
        kwargs = {"prompt": "x", **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="smollm2", **kwargs)
        err = e.value.body
        assert message in err["message"] and err["param"] == param and err["type"] == "invalid_request_error", err
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=[1] * model.max_positions)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be one of system, user, assistant"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "robot", "content": "hi"}])


def test_unknown_model_is_404_and_models_lists_the_served_one(client, base_url):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x")
    assert e.value.code == "model_not_found" and "`gpt-4o` does not exist" in e.value.body["message"]
    assert [m.id for m in client.models.list()] == ["smollm2"]
    assert client.models.retrieve("smollm2").owned_by == "specdraft"
    with urllib.request.urlopen(base_url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "model": "smollm2"}


def test_malformed_bodies_and_routes_get_openai_errors(base_url):
    status, raw = _post(base_url, "/v1/completions", b"{not json")
    assert status == 400 and "must be JSON" in json.loads(raw)["error"]["message"]
    status, raw = _post(base_url, "/v1/completions", b"[1]")
    assert status == 400 and "must be a JSON object, got a list" in json.loads(raw)["error"]["message"]
    status, raw = _post(base_url, "/v1/nothing", b"{}")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


# ---------------------------------------------------------------- tenants, the shared lock, settings


def test_tenant_from_user_and_the_header(base_url):
    body = {"prompt": "def f(", "max_tokens": 1, "temperature": 0, "user": "alice"}
    _, raw = _post(base_url, "/v1/completions", json.dumps(body).encode())
    assert json.loads(raw)["specdraft"]["tenant"] == "alice"
    _, raw = _post(base_url, "/v1/completions", json.dumps(body).encode(), {"X-Specdraft-Tenant": "team-b"})
    assert json.loads(raw)["specdraft"]["tenant"] == "team-b"


def test_grpc_and_http_generations_at_once_share_the_model(client, stub, grpc_text):
    results: dict[str, str] = {}

    def over_grpc() -> None:
        results["grpc"] = collect(stub, request(max_new_tokens=N))[0]

    thread = threading.Thread(target=over_grpc)
    thread.start()
    results["http"] = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=REPEAT, max_tokens=N, temperature=0, stream=True))
    thread.join(120)
    assert results == {"grpc": grpc_text, "http": grpc_text}


def test_api_key_and_http_off(engine):
    from verifier.api.server import create_server

    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, api_key="s3cret",
                                               served_model_name="coder", http_max_body_bytes=100), engine=engine)
    try:
        url = f"http://127.0.0.1:{server.http_port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="s3cret").models.list()] == ["coder"]
        status, raw = _post(url[:-3], "/v1/completions", json.dumps({"prompt": "x" * 100}).encode(),
                            {"Authorization": "Bearer s3cret"})
        assert status == 413 and "must be at most 100 bytes, got 114 bytes" in json.loads(raw)["error"]["message"]
    finally:
        server.stop(0).wait()
    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=-1), engine=engine)
    assert server.http_port is None and server.ports.grpc > 0
    server.stop(0).wait()


def test_a_client_leaving_a_stream_stops_its_generation(client, base_url):
    stream = client.completions.create(model="smollm2", prompt=REPEAT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"no_draft": True})  # one token a step: a minute or more
    next(iter(stream))
    stream.close()  # the generation stops at its next step and frees the model
    quick = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=20)
    r = quick.completions.create(model="smollm2", prompt="def f(", max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1


def test_http_answers_503_until_the_model_is_loaded():
    from verifier.api.http_api import start_http

    http = start_http(VerifierSettings(host="127.0.0.1", http_port=0))
    try:
        url = f"http://127.0.0.1:{http.port}"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health")
        assert e.value.code == 503 and json.loads(e.value.read())["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).completions.create(
                model="smollm2", prompt="x")
        assert e.value.status_code == 503 and "must be serving, got loading" in e.value.message
    finally:
        assert http.stop(0).wait(10)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", r'{"prompt": "a\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", r'{"prompt": ["\udfffx"], "max_tokens": 1}', "prompt"),
    ("/v1/completions", r'{"prompt": "ok", "max_tokens": 1, "user": "a\ud800b"}', "user"),
    ("/v1/completions", r'{"prompt": "ok", "max_tokens": 1, "model": "a\ud800b"}', "model"),
    ("/v1/completions", r'{"prompt": "ok", "max_tokens": 1, "stop": ["x", "\ud800"]}', "stop[1]"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 1}',
     "messages[0].content"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "ok"}], "user": "\udc00"}', "user"),
])
def test_lone_surrogates_are_400_naming_the_field(base_url, path, body, param):
    status, raw = _post(base_url, path, body.encode())
    error = json.loads(raw)["error"]
    assert (status, error["param"]) == (400, param)
    assert error["message"].startswith(f"{param} must be valid Unicode text, got a lone surrogate at character")
