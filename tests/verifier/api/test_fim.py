"""Fill-in-the-middle: the prompt built from the tokenizer's own FIM tokens (the Qwen2.5-Coder
tokenizer), and end to end on /v1/completions with `suffix`, replaying the requests that Continue and
Tabby send, on a small real Qwen2 model with the Qwen2.5-Coder tokenizer whose weights make it a
bigram machine (`fim_fixtures`): after <|fim_middle|> it writes a fixed middle, then <|file_sep|> (a
FIM end token that is not its EOS, so only the FIM end tokens stop it)."""

from __future__ import annotations

import openai

from tests.verifier.api.fim_fixtures import (MIDDLE, PREFIX, SUFFIX, bigram_fim_model, coder_tokenizer,  # noqa: F401
                                             fim_server, post)
from verifier.api.fim import fim_prompt, fim_tokens


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
        events = post(fim_server.http_port, "/v1/completions", body)
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == MIDDLE
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
