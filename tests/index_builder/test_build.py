"""index_builder: tokenizer loading, inputs (directories, JSONL, ShareGPT JSON), builds and
the `specdraft index` CLI, with the real Qwen2.5-Coder tokenizer."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from index_builder import inputs as inputs_mod
from index_builder.build import build
from index_builder.inputs import InputReader, load_exclude_ids
from retriever import _core
from retriever.errors import FailedPrecondition, InvalidArgument
from retriever.store.datastore import open_datastore, read_tokens, split_documents
from retriever.store.tokenizer import load_tokenizer
from specdraft.cli import main

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOKENIZER = SHARED / "models" / "qwen2.5-coder-1.5b" / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} not present")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def decoded_documents(tok, path) -> list[str]:
    docs = split_documents(read_tokens(open_datastore(path)))
    return [tok.tokenizer.decode(d.tolist(), skip_special_tokens=False) for d in docs]


@pytest.fixture
def py_dir(tmp_path):
    """A small source tree: two .py files, a README, a binary .py, a hidden dir."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "pkg" / "b.py").write_text("import os\n\nprint(os.getcwd())  # héllo ✓\n")
    (root / "README.md").write_text("# Title\n\nSome words.\n")
    (root / "blob.py").write_bytes(b"\x00\x01binary")
    (root / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "c.py").write_text("secret = 1\n")
    return root


SHAREGPT = [
    {"id": "keep1", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello!"},
                                      {"from": "human", "value": "More"}, {"from": "gpt", "value": "Sure."}]},
    {"id": "drop1", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "EXCLUDED"}]},
    {"id": "keep2", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A2"}]},
    {"id": "keep3", "conversations": [{"from": "gpt", "value": "Third [with] {braces} \"quotes\""}]},
]


def sharegpt_file(tmp_path, truncate: bool) -> Path:
    text = json.dumps(SHAREGPT, indent=1)
    if truncate:  # cut inside the last conversation, like the real file
        text = text[: text.rindex("Third") + 3]
    path = tmp_path / "sg.json"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ tokenizer

def test_load_tokenizer_from_file_and_directory(tok):
    assert tok.info.name == "qwen2.5-coder-1.5b"
    assert tok.info.vocab_size == 151_936
    assert tok.info.sha256 == hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()
    assert load_tokenizer(TOKENIZER.parent).info == tok.info


def test_tokenizer_errors(tmp_path):
    with pytest.raises(InvalidArgument, match="got no such path"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(InvalidArgument, match="must contain tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(InvalidArgument, match="must be a valid tokenizer.json, got"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------ inputs

def test_directory_input_defaults_and_glob(py_dir):
    reader = InputReader(py_dir)
    texts = list(reader)
    assert texts == [(py_dir / "README.md").read_text(), (py_dir / "a.py").read_text(),
                     (py_dir / "pkg" / "b.py").read_text()]
    assert (reader.summary().documents, reader.summary().skipped) == (3, 2)  # blob.py, latin1.py
    globbed = list(InputReader(py_dir, glob="*.py"))
    assert len(globbed) == 2 and "secret" not in "".join(globbed)
    assert list(InputReader(py_dir, glob="*.py", exclude=["pkg"])) == [(py_dir / "a.py").read_text()]


def test_jsonl_input_and_bad_line(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n')
    assert list(InputReader(good)) == ["one", "two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "one"}\n{"text": 5}\n')
    with pytest.raises(InvalidArgument, match=r"b.jsonl:2: line must be a JSON object with a string 'text'"):
        list(InputReader(bad))
    bad.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(InvalidArgument, match=r"b.jsonl:2: line must be valid JSON, got"):
        list(InputReader(bad))


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_sharegpt_assistant_turns_truncation_and_exclusion(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(inputs_mod, "_READ_CHUNK", chunk)  # small chunks: objects straddle reads
    full = InputReader(sharegpt_file(tmp_path, truncate=False), exclude_ids=frozenset({"drop1"}))
    assert list(full) == ["Hello!", "Sure.", "A2", SHAREGPT[3]["conversations"][0]["value"]]
    assert (full.summary().skipped, full.summary().truncated) == (1, False)
    cut = InputReader(sharegpt_file(tmp_path, truncate=True), exclude_ids=frozenset({"drop1"}))
    assert list(cut) == ["Hello!", "Sure.", "A2"]
    assert cut.summary().truncated and "truncated tail ignored" in cut.summary().describe()


def test_sharegpt_errors_and_exclude_ids_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"id": 1}')
    with pytest.raises(InvalidArgument, match="must be a JSON list of conversations"):
        list(InputReader(path))
    path.write_text('[{"id": 1, "conversations": 3}]')
    with pytest.raises(InvalidArgument, match="conversation 0 must have a 'conversations' list"):
        list(InputReader(path))
    ids = tmp_path / "ids.json"
    ids.write_text('["a", "b"]')
    assert load_exclude_ids(ids) == {"a", "b"}
    ids.write_text('{"a": 1}')
    with pytest.raises(InvalidArgument, match="must be a JSON list of ids"):
        load_exclude_ids(ids)
    with pytest.raises(InvalidArgument, match="must be readable"):
        load_exclude_ids(tmp_path / "none.json")


def test_missing_input(tmp_path):
    with pytest.raises(InvalidArgument, match="must be a file or directory, got no such path"):
        InputReader(tmp_path / "nope")


# ------------------------------------------------------------------ build

def test_build_directory_round_trips_the_text(tok, py_dir, tmp_path):
    report = build([py_dir], tok, tmp_path / "ix", glob="*.py", progress=False)
    assert report.documents == 2 and report.num_tokens == report.tokens > 0
    assert report.bytes_per_token == pytest.approx(report.bytes_on_disk / report.tokens)
    assert report.manifest.name == "ix" and report.manifest.tokenizer == tok.info
    assert report.inputs[0].skipped == 2  # blob.py (NUL bytes), latin1.py (not UTF-8)
    assert decoded_documents(tok, tmp_path / "ix") == [(py_dir / "a.py").read_text(),
                                                       (py_dir / "pkg" / "b.py").read_text()]
    ds = open_datastore(tmp_path / "ix", expect_tokenizer=tok.info)
    ids = np.array(tok.tokenizer.encode(" return a + b", add_special_tokens=False).ids, np.int32)
    lo, hi = _core.testing.find_range(ds.index, ids)
    assert hi - lo == 1


def test_build_jsonl_sharegpt_and_max_tokens(tok, tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "alpha beta"}\n{"text": "gamma"}\n')
    ids = tmp_path / "ids.json"
    ids.write_text('["drop1"]')
    sg = sharegpt_file(tmp_path, truncate=True)
    report = build([jsonl, sg], tok, tmp_path / "ix", exclude_ids=ids, progress=False, name="mixed")
    assert decoded_documents(tok, tmp_path / "ix") == ["alpha beta", "gamma", "Hello!", "Sure.", "A2"]
    assert report.manifest.name == "mixed" and len(report.manifest.sources) == 2
    assert "truncated" in report.manifest.sources[1]
    capped = build([jsonl, sg], tok, tmp_path / "cap", exclude_ids=["drop1"], max_tokens=3, progress=False)
    assert capped.tokens == 3


# ------------------------------------------------------------------ CLI

def test_cli_build_and_inspect(py_dir, tmp_path, capsys):
    out = tmp_path / "ix"
    args = ["index", "build", "--tokenizer", str(TOKENIZER.parent), "--out", str(out), "--glob", "*.py",
            "--name", "demo", "--no-progress", str(py_dir)]
    assert main(args) == 0
    assert "built" in capsys.readouterr().out
    assert main(args) == 2  # exists
    assert "already holds an index" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["index", "inspect", str(out), "--tokenizer", str(TOKENIZER)]) == 0
    text = capsys.readouterr().out
    assert "demo" in text and "sha256 ok" in text and "qwen2.5-coder-1.5b" in text
    assert "def add(a, b):" in text  # a decoded sample
    assert "bytes/token" in text


def test_cli_inspect_tokenizer_mismatch(py_dir, tmp_path, capsys):
    out = tmp_path / "ix"
    assert main(["index", "build", "--tokenizer", str(TOKENIZER), "--out", str(out), "--no-progress",
                 str(py_dir)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(json.loads(TOKENIZER.read_text()), indent=1))
    capsys.readouterr()
    assert main(["index", "inspect", str(out), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tokenizer must be other" in err and "Traceback" not in err
    with pytest.raises(FailedPrecondition):
        open_datastore(out, expect_tokenizer=load_tokenizer(other).info)


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing", "must be a file or directory, got no such path"),
    (lambda d: (d / "bad.jsonl").write_text("nope\n") and d / "bad.jsonl", "bad.jsonl:1: line must be valid JSON"),
])
def test_cli_build_errors(tmp_path, capsys, make, match):
    source = make(tmp_path)
    code = main(["index", "build", "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "ix"),
                 "--no-progress", str(source)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and match in err and "Traceback" not in err
    assert not (tmp_path / "ix").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ix.tmp")]


def test_cli_inspect_corrupt_index(py_dir, tmp_path, capsys):
    out = tmp_path / "ix"
    main(["index", "build", "--tokenizer", str(TOKENIZER), "--out", str(out), "--no-progress", str(py_dir)])
    data = bytearray((out / "sa.u32").read_bytes())
    data[0] ^= 1
    (out / "sa.u32").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["index", "inspect", str(out)]) == 2
    assert "sa.u32 sha256 must be" in capsys.readouterr().err
    assert main(["index", "inspect", str(out), "--no-verify"]) == 0


def _build_cli(capsys, out, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["index", "build", "--tokenizer", str(TOKENIZER), "--out", str(out), "--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name, text", [
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
    ("deep.json", "[" + "[" * 100_000 + "]" * 100_000 + "]"),
    ("deep2.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
])
def test_deeply_nested_json_is_a_one_line_error(tmp_path, capsys, name, text):
    source = tmp_path / name
    source.write_text(text)
    code, err = _build_cli(capsys, tmp_path / "ix", str(source))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err[-500:]
    assert "nested deeper" in err and name in err and "Traceback" not in err and "RecursionError" not in err
    ids = tmp_path / "ids.json"
    ids.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidArgument, match="exclude-ids file .* nested at most"):
        load_exclude_ids(ids)


def test_inputs_without_a_token_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n')
    (tmp_path / "d").mkdir()
    code, err = _build_cli(capsys, tmp_path / "ix", str(empty), str(tmp_path / "d"))
    assert code == 2 and err.startswith("error: INPUT produced no documents") and "empty.jsonl" in err
    assert not (tmp_path / "ix").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ix.")]


def test_out_inside_an_input_is_never_read_nor_any_index(py_dir, tmp_path, capsys, tok):
    other = tmp_path / "other-index"
    assert _build_cli(capsys, other, str(py_dir))[0] == 0
    import shutil

    shutil.copytree(other, py_dir / "old-index")  # an index under the INPUT, not the output
    out = py_dir / "ix"
    for _ in range(2):  # the second build sees the first one's output under its INPUT
        code, err = _build_cli(capsys, out, "--overwrite", "--glob", "*", str(py_dir))
        assert code == 0, err
        docs = decoded_documents(tok, out)
        assert not any("specdraft-corpus" in d or "sha256" in d for d in docs)
        assert len(docs) == 3  # a.py, pkg/b.py, README.md (binary and latin-1 skipped)
    code, err = _build_cli(capsys, tmp_path / "ix2", str(out))
    assert code == 2 and "must be a corpus, got a specdraft index" in err


@pytest.mark.skipif(not os.path.ismount("/dev/shm") or any(Path("/dev/shm").iterdir()),
                    reason="needs /dev/shm as an empty mount point")
def test_out_that_is_a_mount_point_is_refused_naming_out_and_the_cause(py_dir, capsys):
    code, err = _build_cli(capsys, "/dev/shm", str(py_dir))
    assert code == 2 and err.startswith("error: output /dev/shm must not be a mount point") and "Traceback" not in err
    assert not Path("/dev/.shm.tmp-%d" % os.getpid()).exists()
