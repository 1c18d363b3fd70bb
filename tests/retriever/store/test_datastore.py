"""retriever.store.datastore: round trips, atomic writes, validation of corrupt indexes, and the
core's suffix array / find_range against slow pure-Python references."""

import json
import random

import numpy as np
import pytest

from retriever import _core
from retriever.errors import FailedPrecondition, IndexFormatError, InvalidArgument
from retriever.store.datastore import (
    FORMAT,
    MANIFEST_FILE,
    SA_FILE,
    TOKENS_FILE,
    TokenizerInfo,
    open_datastore,
    pack_u24,
    read_tokens,
    split_documents,
    unpack_u24,
    write_datastore,
)
from tests import reference as ref

VOCAB = 151_936
TOK = TokenizerInfo("qwen-test", "ab" * 32, VOCAB)


def random_docs(rng: random.Random, vocab: int, n_docs: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n_docs)]


def flat(docs: list[list[int]]) -> list[int]:
    return [t for d in docs for t in d + [ref.SEP]]


@pytest.fixture
def built(tmp_path):
    """A small datastore of random documents: (path, documents)."""
    docs = random_docs(random.Random(0), 50, 20, 40)
    write_datastore(tmp_path / "ix", [np.array(d, np.int32) for d in docs], TOK, "small", ["unit test"])
    return tmp_path / "ix", docs


def edit_manifest(path, **changes):
    m = json.loads((path / MANIFEST_FILE).read_text())
    m.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(m))


# ------------------------------------------------------------------ round trip

def test_round_trip(built):
    path, docs = built
    ds = open_datastore(path, expect_tokenizer=TOK)
    m = ds.manifest
    assert (m.format, m.format_version, m.kind, ds.name) == (FORMAT, 1, "suffix_array", "small")
    assert m.tokenizer == TOK
    assert m.num_tokens == sum(map(len, docs)) == m.num_suffixes == ds.index.num_suffixes
    assert m.num_documents == len(docs)
    assert m.num_positions == m.num_tokens + m.num_documents == ds.index.num_positions
    assert m.files[TOKENS_FILE].bytes == 3 * m.num_positions and m.files[SA_FILE].bytes == 4 * m.num_suffixes
    assert m.sources == ("unit test",) and m.sorted_depth == 256 and m.build.seconds >= 0
    tokens = read_tokens(ds)
    assert tokens.dtype == np.int32 and tokens.tolist() == flat(docs)
    assert [d.tolist() for d in split_documents(tokens)] == docs
    assert read_tokens(ds, 3, 10).tolist() == flat(docs)[3:10]
    assert [_core.testing.token(ds.index, i) for i in range(m.num_positions)] == flat(docs)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ix"]  # no temp dir left


def test_empty_documents_are_dropped_and_empty_corpus_opens(tmp_path):
    docs = [np.zeros(0, np.int32), np.array([5, 6], np.int32), []]
    m = write_datastore(tmp_path / "a", docs, TOK, "a")
    assert (m.num_documents, m.num_tokens) == (1, 2)
    m = write_datastore(tmp_path / "b", [], TOK, "b")
    ds = open_datastore(tmp_path / "b")
    assert (m.num_positions, ds.index.num_suffixes) == (0, 0)
    assert _core.testing.find_range(ds.index, np.array([1], np.int32)) == (0, 0)


def test_large_vocab_ids_round_trip(tmp_path):
    ids = np.array([0, 1, 65_535, 65_536, 100_000, VOCAB - 1], np.int32)
    write_datastore(tmp_path / "ix", [ids, ids[::-1]], TOK, "big")
    ds = open_datastore(tmp_path / "ix")
    assert read_tokens(ds).tolist() == ids.tolist() + [-1] + ids[::-1].tolist() + [-1]
    wide = TokenizerInfo("wide", "cd" * 32, 0xFFFFFF)
    write_datastore(tmp_path / "wide", [np.array([0xFFFFFE], np.int32)], wide, "wide")
    assert read_tokens(tmp_path / "wide").tolist() == [0xFFFFFE, -1]


def test_pack_u24_is_little_endian():
    assert pack_u24(np.array([0x010203, -1], np.int32)) == bytes([3, 2, 1, 0xFF, 0xFF, 0xFF])
    assert unpack_u24(bytes([3, 2, 1, 0xFF, 0xFF, 0xFF])).tolist() == [0x010203, -1]


@pytest.mark.parametrize("doc, match", [
    ([1, VOCAB], "must be in \\[0, 151936\\), got 151936"),
    ([-1], "got -1"),
    ([[1, 2]], "1-D integer array"),
    (np.array([0.5]), "1-D integer array"),
])
def test_bad_token_ids_are_rejected(tmp_path, doc, match):
    with pytest.raises(InvalidArgument, match=match):
        write_datastore(tmp_path / "ix", [np.array([1]), doc], TOK, "bad")
    assert list(tmp_path.iterdir()) == []


def test_separator_id_is_rejected_even_with_a_huge_vocab(tmp_path):
    huge = TokenizerInfo("huge", "cd" * 32, 1 << 25)
    with pytest.raises(InvalidArgument, match="must be in \\[0, 16777215\\), got 16777215"):
        write_datastore(tmp_path / "ix", [np.array([0xFFFFFF])], huge, "bad")


# ------------------------------------------------------------------ atomicity, overwrite

def test_failed_build_leaves_nothing(tmp_path):
    def docs():
        yield np.array([1, 2, 3], np.int32)
        raise RuntimeError("tokenizer died")

    with pytest.raises(RuntimeError, match="tokenizer died"):
        write_datastore(tmp_path / "ix", docs(), TOK, "x")
    assert list(tmp_path.iterdir()) == []


def test_directory_without_manifest_is_not_an_index(built):
    path, _ = built
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(IndexFormatError, match="manifest.json must exist .*got no such file"):
        open_datastore(path)


def test_overwrite_rules(built, tmp_path):
    path, _ = built
    new = [np.array([7, 8, 9], np.int32)]
    with pytest.raises(InvalidArgument, match="already holds an index; pass overwrite"):
        write_datastore(path, new, TOK, "again")
    assert open_datastore(path).manifest.num_tokens > 3  # untouched
    write_datastore(path, new, TOK, "again", overwrite=True)
    assert read_tokens(open_datastore(path)).tolist() == [7, 8, 9, -1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(InvalidArgument, match="refusing to replace it"):
        write_datastore(other, new, TOK, "x", overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgument, match="refusing"):
        write_datastore(tmp_path / "file", new, TOK, "x", overwrite=True)
    (tmp_path / "empty").mkdir()
    write_datastore(tmp_path / "empty", new, TOK, "x")  # an empty directory is fine
    assert open_datastore(tmp_path / "empty").name == "x"


# ------------------------------------------------------------------ corruption

def test_truncated_token_file(built):
    path, _ = built
    data = (path / TOKENS_FILE).read_bytes()
    (path / TOKENS_FILE).write_bytes(data[:-3])
    with pytest.raises(IndexFormatError, match=f"tokens.u24 size must be {len(data)} bytes, got {len(data) - 3}"):
        open_datastore(path)


def test_missing_suffix_array(built):
    path, _ = built
    (path / SA_FILE).unlink()
    with pytest.raises(IndexFormatError, match="sa.u32 must exist, got no such file"):
        open_datastore(path)


@pytest.mark.parametrize("name", [TOKENS_FILE, SA_FILE])
def test_bit_flip_fails_the_checksum(built, name):
    path, _ = built
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (path / name).write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=f"{name} sha256 must be [0-9a-f]{{64}}, got [0-9a-f]{{64}}"):
        open_datastore(path)
    assert open_datastore(path, verify_checksums=False).index is not None  # sizes still agree


@pytest.mark.parametrize("changes, match", [
    ({"format_version": 2}, "field 'format_version' must be 1, got 2"),
    ({"format": "other"}, "field 'format' must be 'specdraft-corpus', got 'other'"),
    ({"kind": "trie"}, "field 'kind' must be 'suffix_array', got 'trie'"),
    ({"token_width_bytes": 2}, "field 'token_width_bytes' must be 3, got 2"),
    ({"num_tokens": "12"}, "field 'num_tokens' must be a non-negative integer, got '12'"),
    ({"num_documents": 0}, "field 'num_positions' must be \\d+ \\(num_tokens \\+ num_documents\\), got"),
    ({"sorted_depth": 0}, "field 'sorted_depth' must be an integer in \\[1, 2147483647\\], got 0"),
    ({"sorted_depth": 2**31}, "field 'sorted_depth' must be an integer in \\[1, 2147483647\\], got 2147483648"),
    ({"tokenizer": {"name": "x", "sha256": "nope", "vocab_size": 5}}, "'tokenizer.sha256' must be a sha256"),
    ({"files": {TOKENS_FILE: {"bytes": 1, "sha256": "ab" * 32}}}, "field 'files.sa.u32' must be present"),
    ({"sources": "x"}, "field 'sources' must be a list of strings"),
])
def test_bad_manifest_fields(built, changes, match):
    path, _ = built
    edit_manifest(path, **changes)
    with pytest.raises(IndexFormatError, match=match):
        open_datastore(path)


def test_inconsistent_counts(built):
    path, _ = built
    m = json.loads((path / MANIFEST_FILE).read_text())
    edit_manifest(path, num_tokens=m["num_tokens"] + 1, num_positions=m["num_positions"] + 1)
    with pytest.raises(IndexFormatError, match="field 'num_suffixes' must be"):
        open_datastore(path)


def test_manifest_not_json_and_not_a_directory(built, tmp_path):
    path, _ = built
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IndexFormatError, match="manifest.json must be valid JSON, got"):
        open_datastore(path)
    (path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match="manifest must be a JSON object, got list"):
        open_datastore(path)
    with pytest.raises(IndexFormatError, match="must be a directory, got no such path"):
        open_datastore(tmp_path / "missing")


def test_tokenizer_mismatch(built):
    path, _ = built
    other = TokenizerInfo("other", "cd" * 32, VOCAB)
    with pytest.raises(FailedPrecondition, match="tokenizer must be other .*got qwen-test"):
        open_datastore(path, expect_tokenizer=other)
    with pytest.raises(FailedPrecondition, match="vocab 1000"):
        open_datastore(path, expect_tokenizer=TokenizerInfo("qwen-test", TOK.sha256, 1000))


# ------------------------------------------------------------------ suffix array and search

@pytest.mark.parametrize("seed", range(30))
def test_suffix_array_and_find_range_match_references(tmp_path, seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 7, VOCAB])
    docs = random_docs(rng, vocab, rng.randint(1, 8), 50)
    depth = rng.choice([1, 2, 3, 5, 16, 256])
    tokens = flat(docs)
    write_datastore(tmp_path / "ix", [np.array(d) for d in docs], TokenizerInfo("t", TOK.sha256, vocab), "t",
                    sorted_depth=depth)
    ds = open_datastore(tmp_path / "ix")
    sa = np.fromfile(tmp_path / "ix" / SA_FILE, dtype="<u4").tolist()
    assert sorted(sa) == [i for i, t in enumerate(tokens) if t != ref.SEP]
    keys = [ref.suffix_key(tokens, i, depth) for i in sa]
    assert keys == sorted(keys)
    assert [_core.testing.suffix(ds.index, r) for r in range(len(sa))] == sa
    for _ in range(20):
        doc = rng.choice(docs)
        start = rng.randrange(len(doc))
        pattern = doc[start:start + rng.randint(1, min(depth, 6))]
        if rng.random() < 0.3:
            pattern = pattern + [rng.randrange(vocab)]
        if len(pattern) > depth:
            continue
        lo, hi = _core.testing.find_range(ds.index, np.array(pattern, np.int32))
        want = {i for i in range(len(tokens)) if tokens[i:i + len(pattern)] == pattern}
        assert set(sa[lo:hi]) == want
