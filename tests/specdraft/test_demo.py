"""`specdraft demo` (the README's main job) end to end, shortened: real model, stdlib index, retriever and
verifier on free ports, the table and the chart."""

import argparse

from specdraft.demo import DEMO_PROMPTS, run_demo
from verifier.api.settings import VerifierSettings


def test_demo_prints_the_table_and_writes_the_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECDRAFT_DATA_DIR", str(tmp_path / "data"))  # the retriever's file log
    args = argparse.Namespace(index_dir=tmp_path / "stdlib", out=tmp_path / "demo.png", max_new_tokens=4,
                              tenant=None)
    assert run_demo(args, VerifierSettings(host="127.0.0.1", port=0, http_port=-1)) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("code ", "refactor "))]
    assert len(rows) == len(DEMO_PROMPTS) and all(line.endswith("yes") for line in rows)  # same output
    assert "tenant demo-" in out and (tmp_path / "stdlib" / "manifest.json").exists()
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
