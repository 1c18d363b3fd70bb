"""Documents (text strings) from the builder's INPUTs.

- a directory: each text file under it (recursively, sorted, hidden entries and
  `__pycache__` skipped) is one document. By default files with a text-like extension
  (`TEXT_EXTENSIONS`); `glob` (e.g. '*.py') matches file names instead. Binary or
  non-UTF-8 files are skipped and counted; `exclude` patterns drop matching entries.
- a `.jsonl` file: each non-blank line is a JSON object whose string `text` field is
  one document (a bad line raises with file:line).
- a `.json` file in ShareGPT layout: a list of conversations {"id", "conversations":
  [{"from", "value"}]} (or "messages": [{"role", "content"}]); every assistant turn
  (from "gpt"/"assistant"/"chatgpt", role "assistant") is one document. The list is
  read object by object, so a file cut short ends at its last complete conversation.
  Conversations whose id is in `exclude_ids` are skipped.
- any other file: its whole text is one document.

Directories are never read into an index when they are the build's output (`skip`) or hold a
specdraft index (a `manifest.json` whose format is `specdraft-*`); an INPUT that is one is refused.
Unreadable or malformed inputs (JSON nested deeper than Python can decode included) raise
`InvalidArgument` with the path (and line).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from retriever.errors import InvalidArgument
from retriever.store.manifest import index_format

TEXT_EXTENSIONS = frozenset(
    ".py .pyi .pyx .txt .md .rst .c .h .cc .cpp .cxx .hpp .cu .java .kt .scala .js .jsx .ts .tsx .go .rs "
    ".rb .php .swift .cs .m .sh .bash .zsh .sql .r .jl .lua .pl .hs .ml .html .css .xml .yaml .yml .toml "
    ".ini .cfg .tex .proto .cmake".split())
ASSISTANT_SENDERS = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing"})
_READ_CHUNK = 4 << 20  # characters read at a time from a ShareGPT JSON
_MAX_OBJECT = 64 << 20  # a pending ShareGPT object larger than this is treated as malformed


@dataclass(frozen=True)
class InputSummary:
    """What one INPUT contributed, for the manifest's `sources`."""

    path: str
    kind: str  # "directory" | "jsonl" | "sharegpt" | "text"
    documents: int  # read (with max_tokens, some may not be in the index)
    skipped: int = 0  # files skipped as binary/undecodable, or conversations excluded by id
    truncated: bool = False  # a ShareGPT JSON cut short (ended at its last complete object)

    def describe(self) -> str:
        extra = f", {self.skipped} skipped" if self.skipped else ""
        extra += ", truncated tail ignored" if self.truncated else ""
        return f"{self.kind} {self.path} ({self.documents} documents read{extra})"


class InputReader:
    """Iterates the documents of one INPUT; `summary()` is complete once exhausted."""

    def __init__(self, path: str | Path, glob: str | None = None, exclude: Sequence[str] = (),
                 exclude_ids: frozenset[str] = frozenset(), skip: Path | None = None) -> None:
        """`skip`: the build's output directory, never read (nor any index directory)."""
        self.path = Path(path)
        self.glob, self.exclude, self.exclude_ids = glob, tuple(exclude), exclude_ids
        self.skip = skip.resolve() if skip is not None else None
        if not self.path.exists():
            raise InvalidArgument(f"input {path} must be a file or directory, got no such path")
        if self.path.is_dir() and (self.path.resolve() == self.skip or is_index_dir(self.path)):
            what = "the build's output directory" if self.path.resolve() == self.skip else "a specdraft index"
            raise InvalidArgument(f"input {path} must be a corpus, got {what}")
        self.kind = _kind(self.path)
        self.documents = self.skipped = 0
        self.truncated = False

    def summary(self) -> InputSummary:
        return InputSummary(str(self.path), self.kind, self.documents, self.skipped, self.truncated)

    def __iter__(self) -> Iterator[str]:
        gen = {"directory": self._directory, "jsonl": self._jsonl, "sharegpt": self._sharegpt,
               "text": self._text}[self.kind]
        for doc in gen():
            if doc:
                self.documents += 1
                yield doc

    def _directory(self) -> Iterator[str]:
        for file in walk_files(self.path, self.glob, self.exclude, self.skip):
            text = read_text_file(file)
            if text is None:
                self.skipped += 1
            else:
                yield text

    def _text(self) -> Iterator[str]:
        text = read_text_file(self.path)
        if text is None:
            raise InvalidArgument(f"input {self.path} must be UTF-8 text, got a binary or undecodable file")
        yield text

    def _jsonl(self) -> Iterator[str]:
        with _open_text(self.path) as f:
            for lineno, line in enumerate(_lines(f, self.path), 1):
                if line.strip():
                    yield _jsonl_text(line, f"{self.path}:{lineno}")

    def _sharegpt(self) -> Iterator[str]:
        with _open_text(self.path) as f:
            stream = _JsonListStream(f, self.path)
            for i, conv in enumerate(stream):
                where = f"{self.path}: conversation {i}"
                if not isinstance(conv, dict):
                    raise InvalidArgument(f"{where} must be a JSON object, got {type(conv).__name__}")
                if str(conv.get("id")) in self.exclude_ids:
                    self.skipped += 1
                    continue
                yield from assistant_turns(conv, where)
            self.truncated = stream.truncated


def _kind(path: Path) -> str:
    if path.is_dir():
        return "directory"
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "sharegpt"}.get(suffix, "text")


def is_index_dir(path: Path) -> bool:
    """True when `path` holds a specdraft index's manifest.json (either kind, any version)."""
    if not (path / "manifest.json").is_file():
        return False
    try:
        fmt = index_format(path)
    except (RecursionError, ValueError):
        return False
    return isinstance(fmt, str) and fmt.startswith("specdraft-")


def walk_files(root: Path, glob: str | None, exclude: Sequence[str] = (), skip: Path | None = None) -> Iterator[Path]:
    """Files under root, sorted, skipping hidden entries, __pycache__, `exclude` matches, the
    directory `skip` (resolved: the build's output) and index directories (`is_index_dir`)."""
    def excluded(rel: str, name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in exclude)

    def kept(base: Path, d: str) -> bool:
        path = base / d
        return (not d.startswith(".") and d != "__pycache__" and not excluded(str(path.relative_to(root)), d)
                and path.resolve() != skip and not is_index_dir(path))

    def onerror(e: OSError) -> None:
        raise InvalidArgument(f"input directory {e.filename} must be readable, got {e.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        base = Path(dirpath)
        rel_dir = base.relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if kept(base, d))
        for name in sorted(filenames):
            rel = str(rel_dir / name)
            if name.startswith(".") or excluded(rel, name):
                continue
            if glob is not None:
                if not (fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(rel, glob)):
                    continue
            elif Path(name).suffix.lower() not in TEXT_EXTENSIONS:
                continue
            path = base / name
            if path.is_file():  # skips broken links, sockets, ...
                yield path


def read_text_file(path: Path) -> str | None:
    """The file's UTF-8 text; None if it is binary (NUL bytes) or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"input file {path} must be readable, got {e.strerror or e}") from None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"input file {path} must be readable, got {e.strerror or e}") from None


def _lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"input file {path} must be UTF-8, got {e.reason} at byte {e.start}") from None


def _jsonl_text(line: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: line must be valid JSON, got {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise InvalidArgument(f"{where}: line must be JSON nested at most ~{_depth()} levels deep, "
                              "got one nested deeper") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        got = "an object without a string 'text'" if isinstance(obj, dict) else type(obj).__name__
        raise InvalidArgument(f"{where}: line must be a JSON object with a string 'text' field, got {got}")
    return obj["text"]


def assistant_turns(conv: dict, where: str) -> Iterator[str]:
    """The assistant messages of one ShareGPT conversation (from/value or role/content)."""
    turns = conv.get("conversations", conv.get("messages"))
    if not isinstance(turns, list):
        raise InvalidArgument(f"{where} must have a 'conversations' list, got {type(turns).__name__}")
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        sender = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if isinstance(sender, str) and sender.lower() in ASSISTANT_SENDERS and isinstance(text, str):
            yield text


class _JsonListStream:
    """The elements of a top-level JSON list, decoded one at a time from a text stream.

    Stops at the first incomplete element of a file cut short (`truncated` set).
    """

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.eof, self.truncated = "", 0, False, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        """Reads more text; False at end of file."""
        if self.eof:
            return False
        try:
            chunk = self.f.read(_READ_CHUNK)
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"input file {self.path} must be UTF-8, got {e.reason}") from None
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def _skip_space(self) -> str:
        """The next non-space character ('' at end of file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def __iter__(self) -> Iterator[object]:
        if self._skip_space() != "[":
            raise InvalidArgument(f"input {self.path} must be a JSON list of conversations (ShareGPT), "
                                  "got no '[' at its start")
        self.pos += 1
        first = True
        while True:
            c = self._skip_space()
            if c == "]":
                return
            if not first:
                if c != ",":
                    if c == "":
                        break
                    raise InvalidArgument(f"input {self.path}: list elements must be separated by ',', got {c!r}")
                self.pos += 1
            first = False
            obj = self._decode_one()
            if obj is None:
                break
            yield obj
        self.truncated = True

    def _decode_one(self) -> object | None:
        """The next element, reading more as needed; None if the file ends inside it."""
        if self._skip_space() == "":
            return None
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
                self.pos = end
                return obj
            except RecursionError:
                raise InvalidArgument(f"input {self.path}: element must be JSON nested at most ~{_depth()} levels "
                                      "deep, got one nested deeper") from None
            except json.JSONDecodeError as e:
                if len(self.buf) - self.pos > _MAX_OBJECT:
                    raise InvalidArgument(f"input {self.path}: element must be valid JSON under "
                                          f"{_MAX_OBJECT >> 20} MiB, got {e.msg}") from None
                if not self._fill():
                    return None


def load_exclude_ids(path: str | Path | None) -> frozenset[str]:
    """The ids of a JSON list file (conversations to leave out); empty for None."""
    if path is None:
        return frozenset()
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidArgument(f"exclude-ids file {path} must be readable, got {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"exclude-ids file {path} must be valid JSON, got {e}") from None
    except RecursionError:
        raise InvalidArgument(f"exclude-ids file {path} must be JSON nested at most ~{_depth()} levels deep, "
                              "got one nested deeper") from None
    if not isinstance(raw, list) or not all(isinstance(x, (str, int)) for x in raw):
        raise InvalidArgument(f"exclude-ids file {path} must be a JSON list of ids, got {type(raw).__name__}")
    return frozenset(str(x) for x in raw)


def _depth() -> int:
    """About how deep JSON may nest before Python's decoder runs out of recursion."""
    import sys

    return sys.getrecursionlimit()


def iter_documents(readers: Iterable[InputReader]) -> Iterator[str]:
    """The documents of every reader, in order."""
    for reader in readers:
        yield from reader
