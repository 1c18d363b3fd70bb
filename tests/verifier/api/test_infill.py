"""llama.cpp's /infill route: the repo-level prompt of `input_extra` (llama.cpp's layout), the body's
fields (defaults, samplers, bad values), and end to end on a real server, replaying the requests
llama.vscode sends (its completion, streamed, its n_predict 0 warm-up) to the bigram Qwen2 of
`fim_fixtures`; bad inputs and a model without FIM tokens get llama.cpp's error shape."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

import pytest

from tests.verifier.api.fim_fixtures import (MIDDLE, PREFIX, SUFFIX, bigram_fim_model, coder_tokenizer,  # noqa: F401
                                             fim_server, make_bigram_fim_model, post, serve_model)
from verifier.api.fim import extra_context, fim_prompt, fim_tokens
from verifier.api.infill import DEFAULT_TEMPERATURE, parse_infill
from verifier.api.json_fields import ApiError
from verifier.api.settings import VerifierSettings

EXTRA = [{"filename": "util.py", "text": "def helper():\n    return 1\n"}, {"text": "x = 2\n"}]


def llama_vscode_body(prefix: str, line: str, suffix: str, extra: list, n_predict: int = 128) -> dict:
    """llama.vscode's FIM request (src/llama-server.ts createRequestPayload, v0.0.63; n_indent when
    the line is indented)."""
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "prompt": line,
            "n_predict": n_predict, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}


def test_extra_context_follows_llama_cpp_layout(coder_tokenizer):
    tokens = fim_tokens(coder_tokenizer)
    chunks = (("util.py", "A\n"), ("tmp", "B\n"))
    ids = extra_context(tokens, coder_tokenizer, chunks) + fim_prompt(tokens, coder_tokenizer, "p", "s")
    assert coder_tokenizer.decode(ids) == ("<|repo_name|>myproject\n<|file_sep|>util.py\nA\n<|file_sep|>tmp\nB\n"
                                           "<|file_sep|>filename\n<|fim_prefix|>p<|fim_suffix|>s<|fim_middle|>")
    full = extra_context(tokens, coder_tokenizer, chunks)
    assert extra_context(tokens, coder_tokenizer, chunks, 5) == full[-5:]  # cut from the front
    assert extra_context(tokens, coder_tokenizer, chunks, 0) == []
    plain = dataclasses.replace(tokens, repo_id=None, file_sep_id=None)  # a tokenizer without repo-level tokens
    assert coder_tokenizer.decode(extra_context(plain, coder_tokenizer, chunks)) == \
        "\n\n--- snippet ---\n\nA\n\n\n--- snippet ---\n\nB\n"


def test_parse_defaults_samplers_and_ignored_fields():
    r = parse_infill(llama_vscode_body("a\n", "  b", "c\n", EXTRA), "team")
    v = r.values
    assert (v.text, v.suffix, v.fim, v.tenant) == ("a\n  b", "c\n", True, "team")  # prompt continues the prefix
    assert v.fim_extra == (("util.py", "def helper():\n    return 1\n"), ("tmp", "x = 2\n"))
    assert (v.temperature, v.top_k, v.top_p, v.max_new_tokens) == (1.0, 40, 0.99, 128)  # no "temperature" step
    assert not r.stream and r.n_predict == 128
    d = parse_infill({"input_prefix": "", "input_suffix": "", "seed": -1, "n_predict": -1})
    assert (d.values.temperature, d.values.top_k, d.values.top_p) == (DEFAULT_TEMPERATURE, 40, 0.95)
    assert d.values.seed is None and d.values.max_new_tokens == 0 and d.n_predict == -1
    g = parse_infill({"input_prefix": "", "input_suffix": "", "temperature": -1, "top_k": -1, "max_tokens": 7,
                      "samplers": ["temperature"], "stop": "\n\n", "model": "anything"})
    assert (g.values.temperature, g.values.top_k, g.values.top_p, g.values.max_new_tokens) == (0.0, 0, 1.0, 7)
    assert g.values.stops == ("\n\n",)
    assert (v.min_indent, v.line_time_limit_s) == (4, 2.5)  # n_indent, t_max_predict_ms
    assert (d.values.min_indent, d.values.line_time_limit_s) == (0, 0.0)  # absent: off
    off = parse_infill({"input_prefix": "", "input_suffix": "", "n_indent": 0, "t_max_predict_ms": -1}).values
    assert (off.min_indent, off.line_time_limit_s) == (0, 0.0)  # llama.cpp's "off" values


@pytest.mark.parametrize("body, message", [
    ({"input_suffix": ""}, "input_prefix must be a string, got null"),
    ({"input_prefix": ""}, "input_suffix must be a string, got null"),
    ({"input_prefix": 1, "input_suffix": ""}, "input_prefix must be a string, got 1"),
    ({"input_prefix": "", "input_suffix": "", "prompt": ["x"]}, "prompt must be a string, got a list of 1 items"),
    ({"input_prefix": "", "input_suffix": "", "input_extra": "x"},
     'input_extra must be an array of {"filename": string, "text": string}, got \'x\''),
    ({"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "a"}]},
     "text must be a string, got null"),
    ({"input_prefix": "", "input_suffix": "", "input_extra": [3]}, "input_extra[0] must be"),
    ({"input_prefix": "", "input_suffix": "", "n_predict": -2}, "n_predict must be an integer >= -1"),
    ({"input_prefix": "", "input_suffix": "", "samplers": "top_k"}, "samplers must be a list of sampler names"),
    ({"input_prefix": "", "input_suffix": "", "temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"input_prefix": "", "input_suffix": "", "n_indent": -1},
     "n_indent must be an integer >= 0 (0 = no indentation limit), got -1"),
    ({"input_prefix": "", "input_suffix": "", "n_indent": "4"}, "n_indent must be an integer, got '4'"),
    ({"input_prefix": "", "input_suffix": "", "t_max_predict_ms": -2},
     "t_max_predict_ms must be an integer >= -1 (0 or -1 = no time limit), got -2"),
    ({"input_prefix": "", "input_suffix": "", "t_max_predict_ms": 1.5}, "t_max_predict_ms must be an integer, got 1.5"),
    ([1], "the request body must be a JSON object, got a list of 1 items"),
])
def test_bad_fields_name_what_they_must_be(body, message):
    with pytest.raises(ApiError) as e:
        parse_infill(body)
    assert e.value.status == 400 and message in e.value.message


def _raw(port: int, body: object, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infill", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_llama_vscode_completion(fim_server, coder_tokenizer):
    """llama.vscode's request as it sends it (sampling at temperature 1 with top_k/top_p: the bigram
    model is sure of every token): the middle, stopped by the FIM end, with the fields it reads."""
    body = llama_vscode_body("def add(a, b):", "", "\n" + SUFFIX, EXTRA)
    got = post(fim_server.http_port, "/infill", body)
    assert got["content"] == MIDDLE and got["stop"] is True and got["stop_type"] == "eos"
    tokens = fim_tokens(coder_tokenizer)
    chunks = tuple((c.get("filename", "tmp"), c["text"]) for c in EXTRA)
    prompt = extra_context(tokens, coder_tokenizer, chunks) + \
        fim_prompt(tokens, coder_tokenizer, body["input_prefix"], body["input_suffix"])
    assert got["tokens_evaluated"] == len(prompt) == got["timings"]["prompt_n"]
    assert got["tokens_predicted"] == len(coder_tokenizer.encode(MIDDLE)) + 1 == got["timings"]["predicted_n"]
    assert got["timings"]["predicted_ms"] > 0 and got["tokens_cached"] == 0 and got["truncated"] is False
    assert got["generation_settings"]["n_ctx"] == 4096 and got["generation_settings"]["n_predict"] == 128
    assert got["specdraft"]["tenant"] == "default"


def test_streamed_events_end_with_stop_and_no_done(fim_server):
    body = {**llama_vscode_body(PREFIX, "", SUFFIX, []), "stream": True}
    status, raw = _raw(fim_server.http_port, body, {"X-Specdraft-Tenant": "team-a"})
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    assert status == 200 and "[DONE]" not in raw
    assert "".join(e["content"] for e in events) == MIDDLE
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["stop_type"] == "eos" and events[-1]["specdraft"]["tenant"] == "team-a"


def test_warm_up_generates_nothing_and_limits_hold(fim_server):
    """llama.vscode's context-ring warm-up (n_predict 0, empty texts), then n_predict 2 (a limit)."""
    warm = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": EXTRA, "prompt": "",
            "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    got = post(fim_server.http_port, "/infill", warm)
    assert got["content"] == "" and got["tokens_predicted"] == 0 and got["stop"] is True and got["tokens_evaluated"] > 0
    got = post(fim_server.http_port, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 2,
                                                   "temperature": 0})
    assert got["stop_type"] == "limit" and got["tokens_predicted"] == 2 and MIDDLE.startswith(got["content"])


def test_bad_requests_get_llama_cpp_error_shape(fim_server):
    cases = [({"input_prefix": "x"}, "input_suffix must be a string, got null"),
             ({"input_prefix": "x", "input_suffix": "", "top_k": 10 ** 6},
              "top_k must be at most the vocabulary size"),
             ({"input_prefix": "x", "input_suffix": "", "n_indent": True}, "n_indent must be an integer, got true"),
             ({"input_prefix": " x" * 5000, "input_suffix": "", "n_predict": 8}, "prompt must be at most 4095 tokens")]
    for body, message in cases:
        status, raw = _raw(fim_server.http_port, body)
        err = json.loads(raw)["error"]
        assert status == 400 and err["code"] == 400 and err["type"] == "invalid_request_error", raw
        assert message in err["message"] and set(err) == {"code", "message", "type"}
    status, raw = _raw(fim_server.http_port, b"not json".decode())
    assert status == 400 and json.loads(raw)["error"]["message"].startswith("the request body must be a JSON object")


@pytest.fixture(scope="module")
def plain_server(smollm2, retriever_target):
    from verifier.api.server import create_server
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, retriever=retriever_target),
                              engine=Engine(smollm2, CostModel.flat()))
    yield server
    server.stop(0).wait()


def test_model_without_fim_tokens_is_a_400(plain_server):
    status, raw = _raw(plain_server.http_port, {"input_prefix": "def f(", "input_suffix": "\n", "n_predict": 4})
    assert status == 400
    assert json.loads(raw) == {"error": {"code": 400, "message": "model smollm2 has no fill-in-the-middle tokens",
                                         "type": "invalid_request_error"}}


def test_an_error_after_the_stream_began_is_a_llama_cpp_error_event(bigram_fim_model, retriever_target):
    """Past the deadline (here: after the first step) a stream ends with llama.cpp's error object."""
    server = serve_model(bigram_fim_model, retriever_target, request_deadline_s=1e-6)
    try:
        status, raw = _raw(server.http_port, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "stream": True,
                                              "temperature": 0, "n_predict": 16})
    finally:
        server.stop(0).wait()
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    assert status == 200 and "[DONE]" not in raw
    assert events[-1]["error"]["code"] == 504 and events[-1]["error"]["type"] == "server_error", events[-1]
    assert "deadline" in events[-1]["error"]["message"]


TWO_LINES = "    total = a + b\nprint(total)\n"  # its second line is indented less than the first


@pytest.fixture(scope="module")
def two_line_server(coder_tokenizer, tmp_path_factory, retriever_target):
    server = serve_model(make_bigram_fim_model(coder_tokenizer, tmp_path_factory.mktemp("two-lines"), TWO_LINES),
                         retriever_target)
    yield server
    server.stop(0).wait()


def test_llama_vscode_line_limits_end_the_completion(two_line_server):
    """llama.vscode's n_indent (the cursor line's indentation) ends the middle before a line indented
    less; its t_max_predict_ms ends it at the first newline generated after that time (1 ms: the
    newline comes steps after the first token); without either, the whole middle, to the FIM end."""
    port = two_line_server.http_port
    body = {**llama_vscode_body(PREFIX, "", SUFFIX, []), "t_max_predict_ms": 60_000}
    got = post(port, "/infill", body)  # n_indent 4
    assert (got["content"], got["stop_type"]) == ("    total = a + b\n", "limit")
    assert got["tokens_predicted"] == 8 and got["generation_settings"]["n_indent"] == 4  # "print" cut, counted
    events = post(port, "/infill", {**body, "stream": True})
    assert "".join(e["content"] for e in events) == "    total = a + b\n" and events[-1]["stop_type"] == "limit"
    del body["n_indent"]  # llama.vscode leaves it out at column 0
    got = post(port, "/infill", {**body, "t_max_predict_ms": 1})
    assert (got["content"], got["stop_type"], got["tokens_predicted"]) == ("    total = a + b\n", "limit", 7)
    got = post(port, "/infill", body)
    assert (got["content"], got["stop_type"]) == (TWO_LINES, "eos")
