"""Fill-in-the-middle: the prompt built from the tokenizer's own FIM tokens (the Qwen2.5-Coder
tokenizer), and end to end on /v1/completions with `suffix`, replaying the requests that Continue and
Tabby send, on a small real Qwen2 model with the Qwen2.5-Coder tokenizer whose weights make it a
bigram machine: after <|fim_middle|> it writes a fixed middle, then <|file_sep|> (a FIM end token that
is not its EOS, so only the FIM end tokens stop it)."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import openai
import pytest

from verifier.api.fim import fim_prompt, fim_tokens
from verifier.api.settings import VerifierSettings

QWEN_CODER = Path(__file__).resolve().parents[3] / ".." / "shared" / "models" / "qwen2.5-coder-1.5b"
MIDDLE = "    total = a + b\n"


@pytest.fixture(scope="module")
def coder_tokenizer():
    from transformers import AutoTokenizer

    if not (QWEN_CODER / "tokenizer.json").is_file():
        pytest.skip(f"the Qwen2.5-Coder tokenizer must be at {QWEN_CODER}")
    return AutoTokenizer.from_pretrained(str(QWEN_CODER), local_files_only=True)


def test_fim_tokens_come_from_the_tokenizer(coder_tokenizer, smollm2):
    tokens = fim_tokens(coder_tokenizer)
    spell = coder_tokenizer.convert_ids_to_tokens
    assert [spell(t) for t in (tokens.prefix_id, tokens.suffix_id, tokens.middle_id)] == \
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    assert {"<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"} <= set(spell(list(tokens.end_ids)))
    assert fim_tokens(smollm2.tokenizer) is None  # SmolLM2 has no FIM tokens


def test_fim_prompt_is_prefix_suffix_middle(coder_tokenizer):
    tokens = fim_tokens(coder_tokenizer)
    ids = fim_prompt(tokens, coder_tokenizer, "def f(a, b):\n", "    return total\n")
    text = coder_tokenizer.decode(ids)
    assert text == "<|fim_prefix|>def f(a, b):\n<|fim_suffix|>    return total\n<|fim_middle|>"
    assert ids[0] == tokens.prefix_id and ids[-1] == tokens.middle_id
    empty = fim_prompt(tokens, coder_tokenizer, "", "x")  # a cursor at the file's start
    assert coder_tokenizer.decode(empty) == "<|fim_prefix|><|fim_suffix|>x<|fim_middle|>"


@pytest.fixture(scope="module")
def bigram_fim_model(coder_tokenizer, tmp_path_factory):
    """A 1-layer Qwen2 whose attention and MLP write nothing, so the next token is a function of the
    current one (embedding = a basis vector, lm_head maps it on): <|fim_middle|> -> MIDDLE's tokens ->
    <|file_sep|>; every other token -> <|file_sep|>."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    chain = coder_tokenizer.encode(MIDDLE, add_special_tokens=False)
    assert len(set(chain)) == len(chain)
    fim = fim_tokens(coder_tokenizer)
    end = coder_tokenizer.convert_tokens_to_ids("<|file_sep|>")
    eos = coder_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden = 64
    config = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # every token: basis 0 -> <|endoftext|>
        head.zero_()
        head[end, 0] = 1.0
        for k, (cur, nxt) in enumerate(zip([fim.middle_id, *chain], [*chain, end]), start=1):
            emb[cur].zero_()
            emb[cur, k] = 1.0
            head[nxt, k] = 1.0
    folder = tmp_path_factory.mktemp("bigram-fim")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN_CODER / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def fim_server(bigram_fim_model, retriever_target):
    from verifier.api.server import create_server
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine
    from verifier.decoding.model import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(bigram_fim_model), dtype="float32", device="cpu"))
    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, retriever=retriever_target,
                                               served_model_name="coder"), engine=Engine(loaded, CostModel.flat()))
    yield server
    server.stop(0).wait()


def _post(port: int, path: str, body: dict) -> list[dict] | dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    if not body.get("stream"):
        return json.loads(raw)
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


PREFIX, SUFFIX = "def add(a, b):\n", "    return total\n"


def test_fim_completion_returns_the_middle_and_stops_at_the_fim_end(fim_server, coder_tokenizer):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{fim_server.http_port}/v1", api_key="unused", max_retries=0)
    got = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=32, temperature=0)
    assert got.choices[0].text == MIDDLE and got.choices[0].finish_reason == "stop"  # <|file_sep|> ended it
    assert got.usage.completion_tokens == len(coder_tokenizer.encode(MIDDLE)) + 1


def test_continue_and_tabby_request_shapes(fim_server):
    """The bodies those clients send to an OpenAI-compatible /v1/completions for autocomplete."""
    continue_body = {"model": "coder", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 64, "temperature": 0.01,
                     "stop": ["<|endoftext|>", "\n\n\n", "/src/"], "stream": True}
    tabby_body = {"model": "coder", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 64, "temperature": 0.1,
                  "stream": True, "presence_penalty": 0.0}
    for body in (continue_body, tabby_body):
        events = _post(fim_server.http_port, "/v1/completions", body)
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == MIDDLE
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
