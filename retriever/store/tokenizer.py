"""Loading the target model's tokenizer (a Hugging Face `tokenizer.json`).

A datastore records the tokenizer's identity (`TokenizerInfo`): its name, the sha256 of
the tokenizer.json bytes and the vocabulary size with added tokens. The retriever
refuses an index whose tokenizer sha256 differs from its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from retriever.errors import InvalidArgument
from retriever.store.manifest import TokenizerInfo

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` with its identity and the file it came from."""

    tokenizer: object  # tokenizers.Tokenizer
    info: TokenizerInfo
    path: Path  # the tokenizer.json file


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of `path` (that file itself, or DIR/tokenizer.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
        if not p.is_file():
            raise InvalidArgument(f"tokenizer directory {path} must contain {TOKENIZER_FILE}, got none")
    elif not p.exists():
        raise InvalidArgument(f"tokenizer {path} must be a tokenizer.json file or a directory holding one, "
                              "got no such path")
    return p


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    """Loads a tokenizer from a tokenizer.json file or a directory containing one.

    Raises InvalidArgument for a missing, unreadable or invalid file.
    """
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"tokenizer {file} must be readable, got {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
        tok = Tokenizer.from_str(text)
    except (UnicodeDecodeError, Exception) as e:  # tokenizers raises a plain Exception
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidArgument(f"tokenizer {file} must be a valid tokenizer.json, got: {first}") from None
    info = TokenizerInfo(name=_tokenizer_name(file), sha256=hashlib.sha256(data).hexdigest(),
                         vocab_size=tok.get_vocab_size(with_added_tokens=True))
    return LoadedTokenizer(tok, info, file)


def _tokenizer_name(file: Path) -> str:
    """The directory's name for a tokenizer.json (usually the model's), else the file stem.

    (tokenizer.json itself has no name field: the tokenizers library rejects unknown keys.)
    """
    if file.name == TOKENIZER_FILE and file.absolute().parent.name:
        return file.absolute().parent.name
    return file.stem
