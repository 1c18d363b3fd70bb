"""OpenAI Predicted Outputs end to end, with the official `openai` client against the real verifier
server (drafting through a real retriever, the SmolLM2 model, a flat cost model): a prediction never
changes the greedy text, it drafts (Source.PREDICTION), and the usage counts its tokens; bad
predictions get OpenAI's 400; a model without FIM tokens refuses `suffix` with a 400."""

from __future__ import annotations

import doctest
import json

import grpc
import openai
import pytest

import verifier.api.prediction as prediction_module
from protos.specdraft.v1 import verifier_pb2 as pb
from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from verifier.api.prediction import prediction_usage
from verifier.api.settings import VerifierSettings

N = 24  # new tokens per generation: short, the machine is shared
MESSAGES = [{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}]


def test_module_example_and_counts_sum_to_the_prediction():
    assert doctest.testmod(prediction_module).failed == 0
    assert prediction_usage([1, 2, 3, 4], [1, 2, 9, 4]) == (3, 1)
    assert prediction_usage([5, 6], []) == (0, 2)
    assert prediction_usage([], [1, 2]) == (0, 0)
    assert prediction_usage([1, 2, 3], [0, 1, 2, 3, 7]) == (3, 0)


@pytest.fixture(scope="module")
def server(smollm2, retriever_target):
    from verifier.api.server import create_server
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, retriever=retriever_target,
                                               max_new_tokens_cap=512), engine=Engine(smollm2, CostModel.flat()))
    yield server
    server.stop(0).wait()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def plain(client):
    """The greedy chat completion without a prediction."""
    return client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=N, temperature=0)


def _prediction_counts(response) -> tuple[int, int]:
    details = response.usage.completion_tokens_details
    return details.accepted_prediction_tokens, details.rejected_prediction_tokens


def test_the_right_prediction_keeps_the_text_drafts_and_is_accepted(client, plain, smollm2):
    text = plain.choices[0].message.content
    assert text and plain.usage.completion_tokens_details is None  # no prediction: no details
    right = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=N, temperature=0,
                                           prediction={"type": "content", "content": text},
                                           user="right")  # a fresh tenant: no prior output drafts the text

    assert right.choices[0].message.content == text
    accepted, rejected = _prediction_counts(right)
    n_pred = len(smollm2.tokenizer.encode(text, add_special_tokens=False))
    assert accepted + rejected == n_pred and accepted >= n_pred - 1
    by_source = right.model_extra["specdraft"]["accepted_by_source"]
    assert by_source.get("prediction", 0) > 0, by_source


def test_a_wrong_prediction_keeps_the_text_and_is_rejected(client, plain, smollm2):
    wrong = "SELECT name, email FROM users WHERE active = 1 ORDER BY created_at DESC;"
    got = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=N, temperature=0,
                                         prediction={"type": "content", "content": [{"type": "text", "text": wrong}]},
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(got)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    accepted, rejected = _prediction_counts(chunks[-1])
    assert accepted + rejected == len(smollm2.tokenizer.encode(wrong, add_special_tokens=False))
    assert rejected > accepted


def test_completions_take_a_prediction_and_grpc_reports_its_counts(client, server):
    prompt = "def add(a, b):\n    return"
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    text = plain.choices[0].text
    got = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"prediction": {"type": "content", "content": text}})
    assert got.choices[0].text == text
    assert sum(_prediction_counts(got)) > 0
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as channel:
        stub = pb_grpc.VerifierStub(channel)
        replies = list(stub.Generate(pb.GenerateRequest(text=prompt, prediction=text,
                                                        sampling=pb.SamplingParams(max_new_tokens=8))))
    assert "".join(r.text for r in replies) == text
    stats = replies[-1].stats
    assert (stats.accepted_prediction_tokens, stats.rejected_prediction_tokens) == _prediction_counts(got)


def test_bad_predictions_and_suffixes_are_400_in_openai_shape(client, smollm2):
    too_long = "a " * smollm2.max_positions
    cases = [
        ({"type": "text", "content": "x"}, 'prediction must be {"type": "content", "content": a string or a list',
         "prediction"),
        ("just text", 'prediction must be {"type": "content"', "prediction"),
        ({"type": "content", "content": [{"type": "image_url", "image_url": "x"}]},
         "prediction.content must be a string or a list of text parts", "prediction.content"),
        ({"type": "content", "content": too_long},
         f"prediction must be at most {smollm2.max_positions - 1} tokens for this model", "prediction"),
    ]
    for value, message, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2, prediction=value)
        err = e.value.body
        assert message in err["message"] and err["param"] == param and err["type"] == "invalid_request_error", err
    with pytest.raises(openai.BadRequestError) as e:  # SmolLM2 has no FIM tokens
        client.completions.create(model="smollm2", prompt="def f(", suffix="\n    return x\n", max_tokens=4)
    assert e.value.body["message"] == "model smollm2 has no fill-in-the-middle tokens"
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError, match="suffix must be null or"):
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2, extra_body={"suffix": "x"})


def test_an_edit_request_as_edit_clients_send_it(client, server, smollm2):
    """The raw body of an "apply this edit" request (llama.vscode-style, Continue's edit): the file
    and the instruction in the messages, the file as the prediction, streamed."""
    import urllib.request

    code = "def add(a, b):\n    return a + b\n"
    body = {"model": "smollm2", "stream": True, "temperature": 0, "max_tokens": 16,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "You edit code. Answer with the whole file."},
                         {"role": "user", "content": f"Add type hints.\n\n```python\n{code}```"}],
            "prediction": {"type": "content", "content": code}}
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: {")]
    details = events[-1]["usage"]["completion_tokens_details"]
    n_pred = len(smollm2.tokenizer.encode(code, add_special_tokens=False))
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] == n_pred
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
