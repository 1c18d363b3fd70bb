"""FAISS datastores: lexical embedder, build/load/search against a brute-force numpy reference,
manifest and file validation, and `specdraft index build --kind faiss` / `inspect`."""

import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from retriever.errors import FailedPrecondition, IndexFormatError, InvalidArgument  # noqa: E402
from retriever.store.embedding import LexicalEmbedder, load_embedder  # noqa: E402
from retriever.store.faiss_manifest import WindowParams  # noqa: E402
from retriever.store.faiss_store import open_faiss_store, passage_table, write_faiss_store  # noqa: E402
from retriever.store.manifest import TokenizerInfo  # noqa: E402

TOK = TokenizerInfo("toy", "ab" * 32, 500)
WIN = WindowParams(window=32, stride=24, continuation=16)
SHARED = Path(__file__).resolve().parents[3].parent / "shared"
TOKENIZER = SHARED / "models" / "qwen2.5-coder-1.5b" / "tokenizer.json"


def random_docs(rng, n, max_len=300, vocab=60):
    return [rng.integers(0, vocab, int(rng.integers(0, max_len))).astype(np.int32) for _ in range(n)]


def reference_passages(docs, w: WindowParams):
    """[(window int32, passage int32)] by the documented rule, in plain Python."""
    out = []
    for d in (d for d in docs if d.size):
        offs = list(range(0, max(d.size - w.window, 0) + 1, w.stride))
        if offs[-1] + w.window < d.size:
            offs.append(d.size - w.window)
        out += [(d[o:o + w.window], d[o:o + w.window + w.continuation]) for o in offs]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 40)
    path = tmp_path_factory.mktemp("fs") / "store"
    write_faiss_store(path, docs, TOK, "toy", ["random"], embedder=LexicalEmbedder(64), windows=WIN)
    return path, docs


# ------------------------------------------------------------------ embedder

def test_lexical_embedder_contract():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 1000, 50).astype(np.int32) for _ in range(2))
    emb = LexicalEmbedder(128).fit([a, b])
    v = emb.embed([a, b, a, np.zeros(0, np.int32)])  # [4, 128]
    assert v.shape == (4, 128) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1, rtol=1e-5)
    assert not v[3].any()
    np.testing.assert_array_equal(v[0], v[2])
    np.testing.assert_allclose(v[1], emb.embed([b])[0], rtol=1e-6)  # n-grams never cross passages
    again = load_embedder(emb.name, emb.params(), emb.state())
    np.testing.assert_array_equal(again.embed([a]), emb.embed([a]))
    with pytest.raises(IndexFormatError, match="embedder name must be"):
        load_embedder("minilm", {}, None)
    with pytest.raises(InvalidArgument, match="dim must be"):
        LexicalEmbedder(4)


# ------------------------------------------------------------------ build / load / search

def test_passage_table_matches_reference(built):
    path, docs = built
    store = open_faiss_store(path, TOK)
    ref = reference_passages(docs, WIN)
    assert len(store) == len(ref) == store.index.ntotal
    for i, (window, passage) in enumerate(ref):
        np.testing.assert_array_equal(store.passage_tokens(i), passage)
        start, window_end, _ = store.passages[i]
        assert window_end - start == window.size
    table = passage_table(np.array([1, 2, 3, -1, 4, -1], np.int32), WindowParams(2, 5, 1))  # [n, 3]
    np.testing.assert_array_equal(table, [[0, 2, 3], [1, 3, 3], [4, 5, 5]])


def test_flat_search_is_exact(built):
    path, docs = built
    store = open_faiss_store(path)
    assert store.manifest.index.type == "flat" and type(store.index).__name__ == "IndexFlatIP"
    ref = reference_passages(docs, WIN)
    vectors = store.embedder.embed([w for w, _ in ref])  # [n, dim] brute-force reference
    rng = np.random.default_rng(1)
    for _ in range(20):
        doc = docs[int(rng.integers(len(docs)))]
        context = np.concatenate([rng.integers(0, 60, 10).astype(np.int32), doc[: int(rng.integers(1, 80))]])
        hits = store.search(context, 5)
        want = vectors @ store.embedder.embed([context[-WIN.window:]])[0]  # [n]
        order = np.argsort(-want, kind="stable")[:5]
        np.testing.assert_allclose([h.score for h in hits], want[order], rtol=1e-4, atol=1e-5)
        for h in hits:
            assert want[h.id] == pytest.approx(h.score, abs=1e-5)
            np.testing.assert_array_equal(h.tokens, ref[h.id][1])
            np.testing.assert_array_equal(h.tokens[: h.window_len], ref[h.id][0])


def test_hnsw_recall_against_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 150, max_len=400, vocab=200)
    m = write_faiss_store(tmp_path / "h", docs, TOK, "h", embedder=LexicalEmbedder(64), windows=WIN, flat_max=100)
    assert m.index.type == "hnsw" and m.num_passages > 100  # auto switched
    store = open_faiss_store(tmp_path / "h")
    assert type(store.index).__name__ == "IndexHNSWFlat"
    vectors = store.embedder.embed([w for w, _ in reference_passages(docs, WIN)])  # [n, dim]
    contexts = [rng.integers(0, 200, 40).astype(np.int32) for _ in range(30)]
    found = 0
    for context, hits in zip(contexts, store.search_many(contexts, 10)):
        want = vectors @ store.embedder.embed([context[-WIN.window:]])[0]
        found += len({h.id for h in hits} & set(np.argsort(-want)[:10].tolist()))
    assert found / (10 * len(contexts)) >= 0.9


def test_open_with_a_given_embedder(built):
    path, _ = built
    store = open_faiss_store(path)
    same = LexicalEmbedder(64, 3, store.embedder.state())
    assert open_faiss_store(path, embedder=same).embedder is same
    with pytest.raises(FailedPrecondition, match="embedder must be"):
        open_faiss_store(path, embedder=LexicalEmbedder(128))


def test_empty_corpus_and_empty_context(tmp_path):
    write_faiss_store(tmp_path / "e", [np.zeros(0, np.int32)], TOK, "e")
    store = open_faiss_store(tmp_path / "e")
    assert len(store) == 0 and store.search(np.array([1, 2], np.int32), 3) == []
    with pytest.raises(InvalidArgument, match="k must be at least 1"):
        store.search(np.array([1], np.int32), 0)


def test_build_rejects_bad_input(tmp_path):
    with pytest.raises(InvalidArgument, match=r"must be in \[0, 500\), got 500"):
        write_faiss_store(tmp_path / "x", [np.array([1, 500])], TOK, "x")
    with pytest.raises(InvalidArgument, match="index_type must be"):
        write_faiss_store(tmp_path / "x", [np.array([1])], TOK, "x", index_type="ivf")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ validation

def copy_store(built, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(built[0], dst)
    return dst


def edit_manifest(path, **changes):
    raw = json.loads((path / "manifest.json").read_text())
    raw.update(changes)
    (path / "manifest.json").write_text(json.dumps(raw))


def test_truncated_index_file(built, tmp_path):
    path = copy_store(built, tmp_path)
    data = (path / "index.faiss").read_bytes()
    (path / "index.faiss").write_bytes(data[:-10])
    with pytest.raises(IndexFormatError, match=rf"index.faiss size must be {len(data)} bytes, got {len(data) - 10}"):
        open_faiss_store(path)


@pytest.mark.parametrize("name", ["index.faiss", "tokens.u24", "passages.i64", "embedder.f32"])
def test_bit_flip_fails_the_checksum(built, tmp_path, name):
    path = copy_store(built, tmp_path)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 1
    (path / name).write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=rf"{name} sha256 must be [0-9a-f]{{64}}, got"):
        open_faiss_store(path)
    open_faiss_store(path, verify_checksums=False)  # sizes still match


@pytest.mark.parametrize("changes, match", [
    ({"format_version": 2}, "field 'format_version' must be 1, got 2"),
    ({"format": "specdraft-corpus"}, "field 'format' must be 'specdraft-faiss'"),
    ({"num_passages": 1}, r"field 'files.passages.i64.bytes' must be 24 \(24 \* num_passages\)"),
    ({"index": {"type": "ivf"}}, "field 'index.type' must be one of"),
])
def test_bad_manifest_fields(built, tmp_path, changes, match):
    path = copy_store(built, tmp_path)
    edit_manifest(path, **changes)
    with pytest.raises(IndexFormatError, match=match):
        open_faiss_store(path)


def test_missing_manifest_and_wrong_tokenizer(built, tmp_path):
    path = copy_store(built, tmp_path)
    other = TokenizerInfo("other", "cd" * 32, 500)
    with pytest.raises(FailedPrecondition, match="tokenizer must be other"):
        open_faiss_store(path, expect_tokenizer=other)
    (path / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="manifest.json must exist"):
        open_faiss_store(path)


def test_index_contents_must_match_the_manifest(built, tmp_path):
    """A consistent manifest whose index file holds another dimension is refused."""
    import hashlib

    path = copy_store(built, tmp_path)
    index = faiss.IndexFlatIP(32)
    index.add(np.zeros((open_faiss_store(path).index.ntotal, 32), np.float32))
    faiss.write_index(index, str(path / "index.faiss"))
    data = (path / "index.faiss").read_bytes()
    raw = json.loads((path / "manifest.json").read_text())
    raw["files"]["index.faiss"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(IndexFormatError, match="dimension must be 64, got 32"):
        open_faiss_store(path)


def test_overwrite_rules(built, tmp_path):
    path = copy_store(built, tmp_path)
    with pytest.raises(InvalidArgument, match="already holds an index"):
        write_faiss_store(path, [np.array([1, 2])], TOK, "x")
    write_faiss_store(path, [np.array([1, 2])], TOK, "x", overwrite=True)
    assert len(open_faiss_store(path)) == 1


# ------------------------------------------------------------------ CLI

@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} not present")
def test_cli_build_and_inspect(tmp_path, capsys):
    from specdraft.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(60)))
    out = tmp_path / "idx"
    rc = main(["index", "build", "--kind", "faiss", "--tokenizer", str(TOKENIZER), "--out", str(out), "--window",
               "64", "--stride", "48", "--dim", "128", "--no-progress", str(src)])
    assert rc == 0, capsys.readouterr().err
    assert "built" in capsys.readouterr().out
    store = open_faiss_store(out)
    assert store.manifest.embedder.dim == 128 and store.manifest.num_documents == 5
    assert main(["index", "inspect", str(out), "--tokenizer", str(TOKENIZER), "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "specdraft-faiss v1 (faiss, flat" in printed and "sha256 ok" in printed and "def f0_0" in printed
    sa = tmp_path / "sa"  # inspect still understands suffix-array datastores
    assert main(["index", "build", "--tokenizer", str(TOKENIZER), "--out", str(sa), "--no-progress", str(src)]) == 0
    assert main(["index", "inspect", str(sa)]) == 0
    assert "specdraft-corpus v1 (suffix_array" in capsys.readouterr().out
    edit_manifest(out, format_version=9)
    assert main(["index", "inspect", str(out)]) == 2
    assert "field 'format_version' must be 1, got 9" in capsys.readouterr().err
    assert main(["index", "build", "--kind", "faiss", "--tokenizer", str(TOKENIZER), "--out", str(out),
                 "--continuation", "-1", "--overwrite", str(src)]) == 2
    assert "continuation non-negative" in capsys.readouterr().err
