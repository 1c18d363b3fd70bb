"""The verifier service end to end: real servers on free loopback ports (a retriever and a
verifier over the SmolLM2 model), validation errors, streamed text against the tokens,
stats, stop strings, greedy output with drafting equal to plain decoding, a retriever down,
health, and `specdraft generate`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.specdraft.v1 import verifier_pb2 as pb
from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from verifier.api.settings import VerifierSettings

# The model continues the pattern, so context drafts get accepted.
REPEAT = "def inc(x):\n    return x + 1\n\n\ndef inc(x):\n    return x + 1\n\n\ndef inc(x):\n"
MAX_NEW = 32


@pytest.fixture(scope="module")
def model(request):
    """helper D's session fixture `smollm2` when present, else the default model of the settings."""
    try:
        return request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        from verifier.api.server import load

        return load(VerifierSettings())


@pytest.fixture(scope="module")
def engine(model):
    """One engine shared by the servers of this module; a flat cost model (verify every draft
    node) keeps drafting independent of how loaded the machine is while measuring."""
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    return Engine(model, CostModel.flat())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def verifier(engine, retriever: str):
    from verifier.api.server import create_server

    server, port = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=-1, retriever=retriever,
                                                  max_new_tokens_cap=512), engine=engine)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def channel(engine, retriever_target):
    with verifier(engine, retriever_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.VerifierStub(channel)


def request(prompt: str = REPEAT, *, chat: bool = False, no_draft: bool = False, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", MAX_NEW)
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), no_draft=no_draft, tenant="tests")
    if chat:
        req.chat.messages.add(role="user", content=prompt)
    else:
        req.text = prompt
    return req


def collect(stub, req: pb.GenerateRequest):
    responses = list(stub.Generate(req))
    ids = [t for r in responses for t in r.token_ids]
    return "".join(r.text for r in responses), ids, responses[-1]


@pytest.fixture(scope="module")
def plain(stub):
    return collect(stub, request(no_draft=True))


@pytest.fixture(scope="module")
def drafted(stub):
    return collect(stub, request())


# ---------------------------------------------------------------- validation


def _bad_requests(vocab_size: int, max_positions: int) -> list[tuple[pb.GenerateRequest, str]]:
    long_ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * max_positions))
    return [
        (pb.GenerateRequest(), "prompt must be one of text, token_ids, chat"),
        (pb.GenerateRequest(text=""), "text must be non-empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, vocab_size])), f"ids in [0, {vocab_size})"),
        (pb.GenerateRequest(chat=pb.ChatPrompt()), "chat.messages must be non-empty"),
        (pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="robot", content="hi")])),
         "chat.messages[0].role must be one of"),
        (request(temperature=-1), "sampling.temperature must be in [0, 100]"),
        (request(temperature=float("nan")), "sampling.temperature must be in [0, 100]"),
        (request(top_p=0.0), "sampling.top_p must be in (0, 1]"),
        (request(top_p=1.5), "sampling.top_p must be in (0, 1]"),
        (request(top_k=vocab_size + 1), "sampling.top_k must be at most the vocabulary size"),
        (request(max_new_tokens=513), "sampling.max_new_tokens must be at most 512"),
        (request(stop=["ok", ""]), "sampling.stop[1] must be 1 to 256 characters"),
        (request(stop=["x"] * 17), "sampling.stop must hold at most 16 strings"),
        (request(typical_acceptance=True), "sampling.typical_acceptance must be used with temperature > 0"),
        (pb.GenerateRequest(text="x", tenant="t" * 129), "tenant must be at most 128 bytes"),
        (long_ids, f"prompt must be at most {max_positions - 1} tokens for this model, got {max_positions} tokens"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * (max_positions - 8)),
                            sampling=pb.SamplingParams(max_new_tokens=9)), "sampling.max_new_tokens must be at most 8"),
    ]


def test_invalid_requests_are_rejected_with_clear_messages(stub, model):
    for req, message in _bad_requests(model.vocab_size, model.max_positions):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(req))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in e.value.details(), (message, e.value.details())


# ---------------------------------------------------------------- generation


def test_streamed_text_equals_the_decoded_tokens_and_stats_are_reported(model, plain):
    text, ids, last = plain
    assert text == model.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    s = last.stats
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and len(ids) == MAX_NEW == s.new_tokens
    assert s.steps == MAX_NEW and s.mean_accepted_tokens == pytest.approx(1.0)  # no drafting: one token a step
    assert s.draft_nodes == 0 and s.accepted_draft_tokens == 0 and not s.accepted_by_source
    assert s.prompt_tokens == len(model.tokenizer.encode(REPEAT))
    assert s.verify_s > 0 and s.wall_s >= s.verify_s and s.tokens_per_s == pytest.approx(MAX_NEW / s.wall_s)


def test_greedy_output_with_drafting_equals_plain_decoding(plain, drafted):
    assert drafted[1] == plain[1] and drafted[0] == plain[0]
    s = drafted[2].stats
    assert s.new_tokens == MAX_NEW and s.steps < MAX_NEW  # drafts were accepted
    assert s.mean_accepted_tokens == pytest.approx(MAX_NEW / s.steps)
    assert s.accepted_draft_tokens > 0 and s.draft_nodes >= s.accepted_draft_tokens
    assert sum(x.tokens for x in s.accepted_by_source) == s.accepted_draft_tokens
    assert s.draft_s > 0


def test_stop_string_cuts_text_and_tokens(stub, plain, model):
    full = plain[0]
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a stop the greedy output is known to reach
    text, ids, last = collect(stub, request(stop=[stop, "never in the output"]))
    assert text == full[: full.index(stop)]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    decode = lambda t: model.tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    assert stop in decode(ids) and stop not in decode(ids[:-1])  # no token past the one completing the stop
    assert ids == plain[1][: len(ids)] and last.stats.new_tokens == len(ids) < MAX_NEW


def test_chat_prompt(stub):
    text, ids, last = collect(stub, request("Write a Python function that adds two numbers.", chat=True,
                                            max_new_tokens=16))
    assert text and ids and last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert last.stats.prompt_tokens > 10  # the chat template wrapped the message


def test_a_retriever_that_is_down_costs_speed_only(engine, plain):
    with verifier(engine, f"127.0.0.1:{_free_port()}") as ch:
        text, ids, last = collect(pb_grpc.VerifierStub(ch), request())
    assert (text, ids) == plain[:2] and last.stats.accepted_draft_tokens == 0


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "specdraft.v1.Verifier"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_generate_command_against_the_server(channel, plain, tmp_path):
    from specdraft import generate

    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers(dest="command"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "repeat", "prompt": REPEAT}) + "\n")
    target = channel._channel.target().decode()
    args = parser.parse_args(["generate", "--jsonl", str(prompts), "--max-new-tokens", str(MAX_NEW), "--no-draft",
                              "--verifier", target, "--json"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.run(args) == 0
    result = json.loads(out.getvalue())
    assert result["id"] == "repeat" and result["text"] == plain[0] and result["stats"]["new_tokens"] == MAX_NEW


def test_seeded_sampling_gives_the_same_tokens_with_and_without_drafting(stub):
    params = dict(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=12)
    sampled = [collect(stub, request(seed=7, no_draft=no_draft, **params))[1] for no_draft in (True, False)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 12
    assert collect(stub, request(seed=8, no_draft=True, **params))[1] != sampled[0]  # the seed reaches the sampler
