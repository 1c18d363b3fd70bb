"""Opening the indexes a retriever serves: every one checked against the tokenizer, and all of
them against each other (one tokenizer per server)."""

from __future__ import annotations

from typing import Sequence

from retriever import errors
from retriever.store.datastore import CorpusDatastore
from retriever.store.faiss_store import FaissStore, open_index
from retriever.store.manifest import TokenizerInfo
from retriever.store.tokenizer import load_tokenizer


def load_indexes(paths: Sequence[str], tokenizer: str = "") -> list[CorpusDatastore | FaissStore]:
    """Opens every index dir of `paths`, a suffix-array datastore or a FAISS store by its
    manifest's format (`open_index`), checked against the tokenizer (a dir or tokenizer.json) if set.

    Raises IndexFormatError / FailedPrecondition (a tokenizer mismatch, also between indexes).
    """
    expect = tokenizer_info(tokenizer) if tokenizer else None
    corpora = [open_index(path, expect_tokenizer=expect) for path in paths]
    for corpus in corpora[1:]:
        first, other = corpora[0].manifest.tokenizer, corpus.manifest.tokenizer
        if (other.sha256, other.vocab_size) != (first.sha256, first.vocab_size):
            raise errors.FailedPrecondition(
                f"indexes must share one tokenizer, got {corpora[0].path} with {first.name} ({first.sha256[:12]}) "
                f"and {corpus.path} with {other.name} ({other.sha256[:12]})")
    return corpora


def tokenizer_info(path: str) -> TokenizerInfo:
    """The identity of a tokenizer dir or tokenizer.json, as the index builder records it
    (`retriever.store.tokenizer`: sha256 of the file's bytes, vocab size with added tokens).

    Raises FailedPrecondition when it cannot be read.
    """
    try:
        return load_tokenizer(path).info
    except errors.InvalidArgument as e:
        raise errors.FailedPrecondition(str(e)) from None
