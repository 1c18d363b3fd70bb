"""Fixtures of the retriever tests: `data` (a toy tokenizer and corpus datastore, per module),
`srv` (a started server over it) and `stub` (a Retriever stub to it); helpers in
`tests.retriever.service.helpers`."""

import numpy as np
import pytest

from retriever.store.datastore import write_datastore
from retriever.store.loading import tokenizer_info
from tests.retriever.service.helpers import CORPUS_RUN, VOCAB, Running, make_tokenizer, settings


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(corpus datastore dir, its tokenizer dir, another tokenizer dir)."""
    root = tmp_path_factory.mktemp("retriever")
    toy = make_tokenizer(root / "toy", VOCAB)
    docs = [np.array(CORPUS_RUN * 3, np.int32), np.arange(400, 460, dtype=np.int32)]
    write_datastore(root / "corpus", docs, tokenizer_info(str(toy)), "toy-corpus", ["tests"])
    return root / "corpus", toy, make_tokenizer(root / "other", VOCAB + 1)


@pytest.fixture(scope="module")
def srv(data):
    corpus, toy, _ = data
    running = Running(settings(indexes=(str(corpus),), tokenizer=str(toy), reflection=True))
    assert running.server.wait_ready(30)
    yield running
    running.close()


@pytest.fixture()
def stub(srv):
    return srv.stub
