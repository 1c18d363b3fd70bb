"""Shared by the FIM tests (test_fim: /v1/completions with `suffix`; test_infill: llama.cpp's /infill):
the Qwen2.5-Coder tokenizer, a small real Qwen2 model with that tokenizer whose weights make it a
bigram machine (after <|fim_middle|> it writes MIDDLE, then <|file_sep|>: a FIM end token that is
not its EOS), a real verifier server on it, and `post` (a raw JSON request, events parsed)."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from verifier.api.fim import fim_tokens
from verifier.api.settings import VerifierSettings

QWEN_CODER = Path(__file__).resolve().parents[3] / ".." / "shared" / "models" / "qwen2.5-coder-1.5b"
MIDDLE = "    total = a + b\n"
PREFIX, SUFFIX = "def add(a, b):\n", "    return total\n"
LOGIT = 4.0  # lm_head weight of the next token (x 8 after the final norm: sampling at temperature 1 is sure)


@pytest.fixture(scope="module")
def coder_tokenizer():
    from transformers import AutoTokenizer

    if not (QWEN_CODER / "tokenizer.json").is_file():
        pytest.skip(f"the Qwen2.5-Coder tokenizer must be at {QWEN_CODER}")
    return AutoTokenizer.from_pretrained(str(QWEN_CODER), local_files_only=True)


def make_bigram_fim_model(tokenizer, folder: Path, middle: str = MIDDLE) -> Path:
    """A 1-layer Qwen2 whose attention and MLP write nothing, so the next token is a function of the
    current one (embedding = a basis vector, lm_head maps it on): <|fim_middle|> -> `middle`'s tokens
    (all distinct) -> <|file_sep|>; every other token -> <|file_sep|>. Saved in `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    chain = tokenizer.encode(middle, add_special_tokens=False)
    assert len(set(chain)) == len(chain)
    fim = fim_tokens(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|file_sep|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
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
        head[end, 0] = LOGIT
        for k, (cur, nxt) in enumerate(zip([fim.middle_id, *chain], [*chain, end]), start=1):
            emb[cur].zero_()
            emb[cur, k] = 1.0
            head[nxt, k] = LOGIT
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN_CODER / name, folder / name)
    return folder


def serve_model(folder: Path, retriever_target: str, **settings):
    """A real verifier server (gRPC + HTTP on free ports) on the HF model in `folder`; stop it after use."""
    from verifier.api.server import create_server
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine
    from verifier.decoding.model import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(folder), dtype="float32", device="cpu"))
    server, _ = create_server(VerifierSettings(host="127.0.0.1", port=0, http_port=0, retriever=retriever_target,
                                               **settings), engine=Engine(loaded, CostModel.flat()))
    return server


@pytest.fixture(scope="module")
def bigram_fim_model(coder_tokenizer, tmp_path_factory):
    """`make_bigram_fim_model` writing MIDDLE."""
    return make_bigram_fim_model(coder_tokenizer, tmp_path_factory.mktemp("bigram-fim"))


@pytest.fixture(scope="module")
def fim_server(bigram_fim_model, retriever_target):
    server = serve_model(bigram_fim_model, retriever_target, served_model_name="coder")
    yield server
    server.stop(0).wait()


def post(port: int, path: str, body: dict) -> list[dict] | dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    if not body.get("stream"):
        return json.loads(raw)
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
