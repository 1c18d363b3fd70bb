"""FAISS stores feeding the sessions' reference sets: the server opens both index kinds by their
manifest's format, Describe lists both, the drafter drafts store passages as REFERENCE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from protos.specdraft.v1 import retriever_pb2 as pb  # noqa: E402
from retriever.drafting.drafter import Drafter
from retriever.drafting.types import ALL_SOURCES, DrafterConfig, ReferenceParams, Source  # noqa: E402  # noqa: E402
from retriever.errors import FailedPrecondition  # noqa: E402
from retriever.service.server import load_indexes  # noqa: E402
from retriever.store.datastore import write_datastore  # noqa: E402
from retriever.store.embedding import LexicalEmbedder  # noqa: E402
from retriever.store.faiss_manifest import WindowParams  # noqa: E402
from retriever.store.faiss_store import FaissStore, open_faiss_store, open_index, write_faiss_store  # noqa: E402
from retriever.store.loading import tokenizer_info  # noqa: E402
from tests.retriever.service.helpers import VOCAB, Running, make_tokenizer, req, settings

EMPTY = np.empty(0, np.int32)
RUN = np.arange(200, 240, dtype=np.int32)  # only in the FAISS store
CONTEXT = np.array([1, 2, 3, 210, 211, 212, 213, 214, 215], np.int32)  # ends inside RUN
WIN = WindowParams(window=8, stride=4, continuation=8)


def write_store(path: Path, tokenizer_dir: Path) -> Path:
    rng = np.random.default_rng(3)
    docs = [RUN, *(rng.integers(500, 560, 60).astype(np.int32) for _ in range(4))]
    write_faiss_store(path, docs, tokenizer_info(str(tokenizer_dir)), "toy-faiss", ["tests"],
                      embedder=LexicalEmbedder(64), windows=WIN)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(suffix-array datastore, FAISS store, toy tokenizer, other tokenizer) dirs."""
    root = tmp_path_factory.mktemp("refstores")
    toy, other = make_tokenizer(root / "toy", VOCAB), make_tokenizer(root / "other", VOCAB + 1)
    write_datastore(root / "corpus", [np.arange(400, 460, dtype=np.int32)], tokenizer_info(str(toy)), "toy-corpus")
    return root / "corpus", write_store(root / "faiss", toy), toy, other


class Counting:
    """A FaissStore wrapper counting its searches."""

    def __init__(self, store: FaissStore) -> None:
        self.store, self.searches = store, 0

    def search(self, context: np.ndarray, k: int):
        self.searches += 1
        return self.store.search(context, k)


def test_store_passages_draft_as_reference(dirs):
    store = Counting(open_faiss_store(dirs[1]))
    d = Drafter(DrafterConfig(sources=ALL_SOURCES, reference=ReferenceParams(refresh_tokens=4)),
                references=[store])  # type: ignore[list-item]
    tree = d.draft("t", "s", CONTEXT, EMPTY, 8).tree
    assert tree.token_ids[:4].tolist() == [216, 217, 218, 219]
    assert set(tree.sources.tolist()) == {Source.REFERENCE}
    assert store.searches == 1
    d.draft("t", "s", None, np.array([216, 217], np.int32), 8)
    assert store.searches == 1  # within refresh_tokens: the same reference set
    tree = d.draft("t", "s", None, np.array([218, 219], np.int32), 8).tree
    assert store.searches == 2 and tree.token_ids[0] == 220


def test_default_config_never_searches_the_stores(dirs):
    store = Counting(open_faiss_store(dirs[1]))
    d = Drafter(DrafterConfig(), references=[store])  # type: ignore[list-item]
    plain = Drafter(DrafterConfig())
    for drafter in (d, plain):
        drafter.draft("t", "s0", np.array([7, 210, 211, 212], np.int32), EMPTY, 8)
        drafter.end_session("t", "s0")
    got, want = (x.draft("t", "s", CONTEXT, EMPTY, 8).tree for x in (d, plain))
    for a, b in zip((got.token_ids, got.parents, got.scores, got.sources),
                    (want.token_ids, want.parents, want.scores, want.sources)):
        np.testing.assert_array_equal(a, b)
    assert store.searches == 0 and d._sessions[("t", "s")].reference is None


def test_server_opens_both_kinds_and_drafts_from_the_store(dirs):
    corpus, faiss_dir, toy, _ = dirs
    assert open_index(faiss_dir).manifest.kind == "faiss" and open_index(corpus).manifest.kind == "suffix_array"
    s = settings(indexes=(str(corpus), str(faiss_dir)), tokenizer=str(toy))
    running = Running(s, drafter=Drafter(DrafterConfig(sources=ALL_SOURCES)))
    try:
        assert running.server.wait_ready(30)
        d = running.stub.Describe(pb.DescribeRequest(), timeout=5)
        assert [(i.name, i.kind, i.path) for i in d.indexes] == [
            ("toy-corpus", "suffix_array", str(corpus)), ("toy-faiss", "faiss", str(faiss_dir))]
        assert d.indexes[1].tokens == 40 + 4 * 60 and d.indexes[1].vocab_size == VOCAB and d.limits.vocab_size == VOCAB
        tree = running.stub.Draft(req(prompt=CONTEXT.tolist(), max_nodes=4), timeout=5).tree
        assert list(tree.token_ids) == [216, 217, 218, 219] and set(tree.sources) == {int(Source.REFERENCE)}
    finally:
        running.close()


def test_store_of_another_tokenizer_is_refused(dirs, tmp_path):
    corpus, faiss_dir, toy, other = dirs
    with pytest.raises(FailedPrecondition, match=f"index {faiss_dir} tokenizer must be other"):
        load_indexes(settings(indexes=(str(faiss_dir),), tokenizer=str(other)))
    foreign = write_store(tmp_path / "foreign", other)
    with pytest.raises(FailedPrecondition, match="indexes must share one tokenizer"):
        load_indexes(settings(indexes=(str(corpus), str(foreign))))


def test_the_reference_set_is_switched_on_by_settings():
    from retriever.drafting.types import ALL_SOURCES, DEFAULT_SOURCES, Source
    from retriever.service.settings import RetrieverSettings

    assert RetrieverSettings().drafter_config().sources == DEFAULT_SOURCES
    on = RetrieverSettings.from_env({"SPECDRAFT_REFERENCE_SET": "1"}).drafter_config()
    assert on.sources == ALL_SOURCES and Source.REFERENCE in on.sources
