"""`specdraft demo` (the README's main job) end to end, shortened: real model, stdlib index, retriever and
verifier on free ports, the anchors, the table, the JSON and the chart. On HF (SmolLM2-135M, three rows, HF
prompt lookup as the anchor) and on llama.cpp through the command line (SmolLM2-135M Q4_1, two rows,
llama.cpp's prompt lookup at 10 and 16: `--lookup 10,16`); Qwen2.5-Coder, the default, is not fetched in CI."""

import argparse
import json

import pytest

from specdraft.cli import main
from specdraft.demo import DEMO_PROMPTS, lookup_tokens, run_demo
from verifier.api.settings import VerifierSettings


def test_demo_prints_the_table_and_writes_the_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECDRAFT_DATA_DIR", str(tmp_path / "data"))  # the retriever's file log
    args = argparse.Namespace(index_dir=tmp_path / "stdlib", out=tmp_path / "demo.png", json=None, max_new_tokens=4,
                              rows="rename,complete,tests-again", tenant=None, lookup="16")  # a chat edit, a completion, a tenant
    assert run_demo(args, VerifierSettings(host="127.0.0.1", port=0, http_port=-1, backend="hf")) == 0
    out = capsys.readouterr().out
    names = ("rename", "complete", "tests-again")
    rows = [line for line in out.splitlines() if line.startswith(names) and "done:" not in line]
    assert len(rows) == len(names) and all(" yes" in line for line in rows)  # same output as plain
    assert "HF lookup 10" in out and "tenant demo-" in out and (tmp_path / "stdlib" / "manifest.json").exists()
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert doc["backend"] == "hf" and [r["name"] for r in doc["rows"]] == list(names)
    assert all([run["method"] for run in r["runs"]] == ["plain", "HF lookup 10", "specdraft"] for r in doc["rows"])


def test_demo_on_llama_cpp_runs_the_llama_cpp_prompt_lookup_anchors(tmp_path, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("SPECDRAFT_DATA_DIR", str(tmp_path / "data"))
    rc = main(["demo", "--backend", "llama.cpp", "--model", "smollm2", "--rows", "rename,tests-again",
               "--max-new-tokens", "12", "--index-dir", str(tmp_path / "stdlib"), "--out", str(tmp_path / "d.png"),
               "--json", str(tmp_path / "figures.json"), "--threads", "2", "--lookup", "10,16"])
    assert rc == 0
    doc = json.loads((tmp_path / "figures.json").read_text())
    assert doc["backend"] == "llama.cpp" and [r["name"] for r in doc["rows"]] == ["rename", "tests-again"]
    for row in doc["rows"]:
        methods = {run["method"]: run for run in row["runs"]}
        assert list(methods) == ["plain", "llama.cpp lookup 10", "llama.cpp lookup 16", "specdraft"]
        assert methods["specdraft"]["same_as_plain"] and methods["plain"]["new_tokens"] == 12
        assert row["divergence"] is None  # nothing to replay where the outputs are equal
        assert all(run["new_tokens"] == 12 and run["decode_tok_s"] > 0 for run in row["runs"])
        assert row["prefill_s"] > 0  # llama.cpp keeps the prompt's cache: one prefill for plain and specdraft
    assert "lookup16 tok/s" in capsys.readouterr().out and (tmp_path / "d.png").exists()


def test_unknown_rows_are_refused_before_anything_loads(capsys):
    assert main(["demo", "--rows", "rename,nope"]) == 2
    assert "rows must be among" in capsys.readouterr().err


def test_lookup_anchors_parse_or_are_refused_before_anything_loads(capsys):
    assert lookup_tokens("16") == (16,) and lookup_tokens("10,16") == (10, 16)
    for bad in ("", "x", "0", "65", "10,10", "1,2,3,4,5", "10;16"):
        with pytest.raises(ValueError, match="--lookup must be 1-4 distinct comma-separated integers"):
            lookup_tokens(bad)
    assert main(["demo", "--lookup", "ten"]) == 2
    err = capsys.readouterr().err
    assert "--lookup must be 1-4 distinct" in err and "got 'ten'" in err


def test_the_gguf_tokenizer_is_cached_and_loads_the_same(tmp_path):
    pytest.importorskip("llama_cpp")
    from pathlib import Path

    from specdraft.demo_runs import cached_tokenizer
    from verifier.decoding.model import ModelSpec, resolve_gguf

    gguf = Path(resolve_gguf(ModelSpec("smollm2")))
    first = cached_tokenizer(gguf, tmp_path)
    saved = tmp_path / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    assert (saved / "tokenizer_config.json").is_file()
    again = cached_tokenizer(gguf, tmp_path)
    chat = [{"role": "user", "content": "Rename `acc` to `totals`:\n```python\nacc = {}\n```"}]
    assert again.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        first.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert again.encode(DEMO_PROMPTS[0].prompt) == first.encode(DEMO_PROMPTS[0].prompt)
    assert again.eos_token_id == first.eos_token_id
