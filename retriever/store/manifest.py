"""The manifest of a corpus datastore (format "specdraft-corpus", version 1).

`manifest.json` is written last by a build; see `retriever.store.datastore` for the files it
describes. `read_manifest` checks every field and the counts' consistency, raising
IndexFormatError with the file and field named; `check_tokenizer` raises
FailedPrecondition for an index built with another tokenizer. Pure module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from retriever.errors import FailedPrecondition, IndexFormatError

FORMAT = "specdraft-corpus"
FORMAT_VERSION = 1
KIND = "suffix_array"
TOKEN_WIDTH_BYTES = 3
SEPARATOR_U24 = 0xFFFFFF
MAX_TOKEN_ID = SEPARATOR_U24 - 1
MAX_POSITIONS = (1 << 31) - 1  # the suffix array builder's limit
DEFAULT_SORTED_DEPTH = 256
TOKENS_FILE, SA_FILE, MANIFEST_FILE = "tokens.u24", "sa.u32", "manifest.json"
INDEX_FILES = frozenset({TOKENS_FILE, SA_FILE, MANIFEST_FILE})


@dataclass(frozen=True)
class TokenizerInfo:
    """Identity of the tokenizer an index was built with."""

    name: str
    sha256: str  # hex digest of the tokenizer.json bytes
    vocab_size: int


@dataclass(frozen=True)
class FileInfo:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class BuildInfo:
    created_at: str  # ISO 8601, UTC
    specdraft_version: str
    seconds: float


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated manifest.json of a datastore."""

    format: str
    format_version: int
    kind: str
    name: str
    tokenizer: TokenizerInfo
    num_tokens: int
    num_documents: int
    num_positions: int
    num_suffixes: int
    token_width_bytes: int
    sorted_depth: int
    files: dict[str, FileInfo]
    sources: tuple[str, ...]
    build: BuildInfo

    def to_json(self) -> str:
        return manifest_json(self)


def manifest_json(manifest: Any) -> str:
    """A manifest dataclass (either index kind) as the indented JSON written last by a build."""
    d = asdict(manifest)
    d["sources"] = list(manifest.sources)
    return json.dumps(d, indent=2) + "\n"


def check_tokenizer(manifest: Manifest, root: Path, expect: TokenizerInfo) -> None:
    """Raises FailedPrecondition unless the index was built with tokenizer `expect`."""
    got = manifest.tokenizer
    if got.sha256 != expect.sha256 or got.vocab_size != expect.vocab_size:
        raise FailedPrecondition(
            f"index {root} tokenizer must be {expect.name} (sha256 {expect.sha256[:12]}, vocab "
            f"{expect.vocab_size}), got {got.name} (sha256 {got.sha256[:12]}, vocab {got.vocab_size})")


def read_manifest(root: Path) -> Manifest:
    """Parses and validates `root`/manifest.json (fields and their consistency only)."""
    return _parse_manifest(load_manifest_json(root), root / MANIFEST_FILE)


def load_manifest_json(root: Path) -> Any:
    """The raw JSON of `root`/manifest.json (either index kind); IndexFormatError if missing or unreadable."""
    if not root.is_dir():
        got = "a file" if root.exists() else "no such path"
        raise IndexFormatError(f"index {root} must be a directory, got {got}")
    mpath = root / MANIFEST_FILE
    try:
        return json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{mpath} must exist (an interrupted build leaves none), got no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{mpath} must be readable, got {e}") from None
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{mpath} must be valid JSON, got {e}") from None


def index_format(root: Path) -> object:
    """The manifest's `format` value; None when it cannot be read (the kind's opener then says why)."""
    try:
        raw = load_manifest_json(root)
    except IndexFormatError:
        return None
    return raw.get("format") if isinstance(raw, dict) else None


class _Fields:
    """Typed reads of manifest fields; errors name the file and the field."""

    def __init__(self, raw: Any, where: str, prefix: str = "") -> None:
        if not isinstance(raw, dict):
            raise IndexFormatError(f"{where}: {prefix or 'manifest'} must be a JSON object, got {type(raw).__name__}")
        self.raw, self.where, self.prefix = raw, where, prefix

    def get(self, key: str, typ: type | tuple[type, ...], check: Callable[[Any], bool] = lambda v: True,
            want: str = "") -> Any:
        field = f"{self.prefix}{key}"
        if key not in self.raw:
            raise IndexFormatError(f"{self.where}: field '{field}' must be present, got none")
        v = self.raw[key]
        ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, (int, float)))
        if not ok or not check(v):
            raise IndexFormatError(f"{self.where}: field '{field}' must be {want or _tname_of(typ)}, got {v!r}")
        return v

    def count(self, key: str) -> int:
        return self.get(key, int, lambda v: v >= 0, "a non-negative integer")

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key, dict, want="a JSON object"), self.where, f"{self.prefix}{key}.")


def _tname_of(typ: type | tuple[type, ...]) -> str:
    return {str: "a string", int: "an integer", dict: "a JSON object", list: "a list"}.get(typ, str(typ))


def _is_hex64(v: str) -> bool:
    return len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def check_header(f: _Fields, fmt: str, version: int, kind: str) -> None:
    """The fields every index kind pins: format, format_version, kind and token_width_bytes."""
    f.get("format", str, lambda v: v == fmt, f"'{fmt}'")
    f.get("format_version", int, lambda v: v == version, f"{version}")
    f.get("kind", str, lambda v: v == kind, f"'{kind}'")
    f.get("token_width_bytes", int, lambda v: v == TOKEN_WIDTH_BYTES, f"{TOKEN_WIDTH_BYTES}")


def parse_tokenizer(t: _Fields) -> TokenizerInfo:
    return TokenizerInfo(t.get("name", str), t.get("sha256", str, _is_hex64, "a sha256 hex digest"),
                         t.get("vocab_size", int, lambda v: 0 < v <= SEPARATOR_U24, "in [1, 16777215]"))


def parse_files(fs: _Fields, names: tuple[str, ...]) -> dict[str, FileInfo]:
    """{name: FileInfo} of the files `names`, each with its size and sha256."""
    files = {}
    for name in names:
        e = fs.sub(name)
        files[name] = FileInfo(e.count("bytes"), e.get("sha256", str, _is_hex64, "a sha256 hex digest"))
    return files


def parse_build(b: _Fields) -> BuildInfo:
    return BuildInfo(b.get("created_at", str), b.get("specdraft_version", str),
                     float(b.get("seconds", (int, float), want="a number")))


def parse_sources(f: _Fields) -> tuple[str, ...]:
    return tuple(f.get("sources", list, lambda v: all(isinstance(s, str) for s in v), "a list of strings"))


def _parse_manifest(raw: Any, mpath: Path) -> Manifest:
    f = _Fields(raw, str(mpath))
    check_header(f, FORMAT, FORMAT_VERSION, KIND)
    tokenizer = parse_tokenizer(f.sub("tokenizer"))
    files = parse_files(f.sub("files"), (TOKENS_FILE, SA_FILE))
    build, sources = parse_build(f.sub("build")), parse_sources(f)
    m = Manifest(format=FORMAT, format_version=FORMAT_VERSION, kind=KIND, name=f.get("name", str),
                 tokenizer=tokenizer, num_tokens=f.count("num_tokens"), num_documents=f.count("num_documents"),
                 num_positions=f.count("num_positions"), num_suffixes=f.count("num_suffixes"),
                 token_width_bytes=TOKEN_WIDTH_BYTES,
                 sorted_depth=f.get("sorted_depth", int, lambda v: 1 <= v <= MAX_POSITIONS,  # a C int in the core
                                    f"an integer in [1, {MAX_POSITIONS}]"),
                 files=files, sources=sources, build=build)
    _check_counts(m, str(mpath))
    return m


def _check_counts(m: Manifest, where: str) -> None:
    expected = [
        ("num_positions", m.num_tokens + m.num_documents, m.num_positions, "num_tokens + num_documents"),
        ("num_suffixes", m.num_tokens, m.num_suffixes, "num_tokens"),
        (f"files.{TOKENS_FILE}.bytes", m.num_positions * TOKEN_WIDTH_BYTES, m.files[TOKENS_FILE].bytes,
         "3 * num_positions"),
        (f"files.{SA_FILE}.bytes", m.num_suffixes * 4, m.files[SA_FILE].bytes, "4 * num_suffixes"),
    ]
    for field, want, got, how in expected:
        if want != got:
            raise IndexFormatError(f"{where}: field '{field}' must be {want} ({how}), got {got}")
    if m.num_positions > MAX_POSITIONS:
        raise IndexFormatError(f"{where}: field 'num_positions' must be at most {MAX_POSITIONS}, "
                               f"got {m.num_positions}")
