"""On-disk corpus datastores: format "specdraft-corpus", version 1.

A datastore is a directory of three files:

- `tokens.u24`: every document's token ids as little-endian 24-bit integers, each
  document followed by one separator 0xFFFFFF. num_positions = num_tokens +
  num_documents entries, 3 bytes each. Empty documents are not stored.
- `sa.u32`: the suffix array, little-endian uint32, one entry per non-separator
  position (num_suffixes = num_tokens), from
  `retriever._core.build_suffix_array(tokens, sorted_depth)` over the tokens as int32
  with -1 separators: suffixes sorted on their first sorted_depth tokens.
- `manifest.json`, written last (a directory without one is not an index):
  `format` "specdraft-corpus", `format_version` 1, `kind` "suffix_array", `name`,
  `tokenizer` {name, sha256 (of tokenizer.json), vocab_size}, `num_tokens`,
  `num_documents`, `num_positions`, `num_suffixes`, `token_width_bytes` 3,
  `sorted_depth`, `files` {file name: {bytes, sha256}}, `sources` (list of strings
  describing the inputs) and `build` {created_at (ISO 8601 UTC), specdraft_version,
  seconds}.

Writes are atomic: the files go to a sibling `.OUT.tmp-<pid>` directory that is
renamed into place once the manifest is in it; the next build of OUT cleans up after a
killed one (`recover_killed_builds`). `open_datastore` checks every field,
size and checksum before memory-mapping the files into a `_core.CorpusIndex`.
Pure module: imports neither grpc nor torch.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from retriever import __version__
from retriever.errors import IndexFormatError, InvalidArgument
from retriever.store.manifest import (
    DEFAULT_SORTED_DEPTH,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILES,
    KIND,
    MANIFEST_FILE,
    MAX_POSITIONS,
    SA_FILE,
    SEPARATOR_U24,
    TOKEN_WIDTH_BYTES,
    TOKENS_FILE,
    BuildInfo,
    FileInfo,
    Manifest,
    TokenizerInfo,
    check_tokenizer,
    read_manifest,
)

_HASH_CHUNK = 8 << 20
_WRITE_BLOCK = 1 << 20  # positions packed and written at a time


@dataclass(frozen=True)
class CorpusDatastore:
    """An opened datastore: its manifest and the memory-mapped index."""

    path: Path
    manifest: Manifest
    index: Any  # retriever._core.CorpusIndex

    @property
    def name(self) -> str:
        return self.manifest.name


# ---------------------------------------------------------------- token packing

def pack_u24(tokens: np.ndarray) -> bytes:
    """int32[n] token ids (-1 = separator) -> n * 3 little-endian bytes."""
    values = np.where(tokens < 0, SEPARATOR_U24, tokens).astype("<u4")  # uint32[n]
    return values.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()


def unpack_u24(raw: bytes | np.ndarray) -> np.ndarray:
    """n * 3 little-endian bytes -> int32[n] with -1 for the separator."""
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)  # [n, 3]
    values = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    values[values == SEPARATOR_U24] = -1
    return values


def _check_document(doc: Any, vocab_size: int, index: int) -> np.ndarray:
    """Validated int32[k] copy of one document; raises InvalidArgument."""
    arr = np.asarray(doc)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgument(f"document {index} must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        limit = min(vocab_size, SEPARATOR_U24)
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(f"token ids of document {index} must be in [0, {limit}), got {bad}")
    return arr.astype(np.int32, copy=False)


# ---------------------------------------------------------------- writing

def write_datastore(out_dir: str | Path, documents: Iterable[np.ndarray], tokenizer: TokenizerInfo, name: str,
                    sources: Iterable[str] = (), *, sorted_depth: int = DEFAULT_SORTED_DEPTH,
                    overwrite: bool = False) -> Manifest:
    """Writes `documents` (each int32[k] of ids < tokenizer.vocab_size) as a datastore.

    Atomic: nothing appears at `out_dir` unless the whole build succeeds. An existing
    index there is replaced only with overwrite=True; any other existing non-empty
    path is refused. `sources` is iterated after the documents (it may describe them).
    Raises InvalidArgument (bad ids, sizes, target) or OSError.
    """
    if sorted_depth < 1:
        raise InvalidArgument(f"sorted_depth must be at least 1, got {sorted_depth}")
    with staged_index(Path(out_dir).absolute(), overwrite) as tmp:
        start = time.perf_counter()
        tokens, num_documents = collect_documents(documents, tokenizer.vocab_size)  # int32[num_positions]
        files = {TOKENS_FILE: write_tokens(tmp / TOKENS_FILE, tokens),
                 SA_FILE: _write_suffix_array(tmp / SA_FILE, tokens, sorted_depth)}
        del tokens
        manifest = _make_manifest(name, tokenizer, num_documents, sorted_depth, files, sources,
                                  time.perf_counter() - start)
        write_synced(tmp / MANIFEST_FILE, manifest.to_json().encode())
    return manifest


def check_target(out: Path, overwrite: bool, index_files: frozenset[str] = INDEX_FILES) -> None:
    """Raises InvalidArgument unless writing an index at `out` is allowed (see write_datastore).

    Only a directory holding nothing but `index_files` (datastore files) counts as an index. A
    mount point is refused: the index is staged beside it and renamed onto it, which the kernel
    refuses for a mount point (EBUSY).
    """
    if not out.exists() and not out.is_symlink():
        return
    if os.path.ismount(out):
        raise InvalidArgument(f"output {out} must not be a mount point (the index is staged in {out.parent} and "
                              f"renamed onto OUT, which a mount point cannot be), got a mount point; give a "
                              f"directory inside it, e.g. {out / 'index'}")
    names = {p.name for p in out.iterdir()} if out.is_dir() and not out.is_symlink() else None
    if names == set():
        return
    if names is None or not names <= index_files:
        raise InvalidArgument(f"output {out} must be a new path, an empty directory or an existing index, "
                              "got another file or directory (refusing to replace it)")
    if not overwrite:
        raise InvalidArgument(f"output {out} already holds an index; pass overwrite (--overwrite) to replace it")


@contextlib.contextmanager
def staged_index(out: Path, overwrite: bool, index_files: frozenset[str] = INDEX_FILES) -> Iterator[Path]:
    """A fresh sibling directory `.OUT.tmp-<pid>` to write an index into: renamed to `out`
    (`move_into_place`) when the block completes, removed in every case. Checks the target
    first (`check_target`: InvalidArgument)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_killed_builds(out)
    check_target(out, overwrite, index_files)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, out, overwrite, index_files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_killed_builds(out: Path) -> list[Path]:
    """Cleans up after builds of `out` killed mid-way (the PID in the name is gone): a staging
    `.OUT.tmp-PID` is removed; a moved-aside `.OUT.old-PID` is put back when `out` is missing
    (killed between the two renames of `move_into_place`), else removed. Returns what it touched."""
    touched = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        stem, _, pid = path.name.rpartition("-")
        if stem not in (f".{out.name}.tmp", f".{out.name}.old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if stem.endswith(".old") and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)
        touched.append(path)
    return touched


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def move_into_place(tmp: Path, out: Path, overwrite: bool, index_files: frozenset[str] = INDEX_FILES) -> None:
    """Renames tmp to out; an existing index there (overwrite) is moved aside first."""
    check_target(out, overwrite, index_files)  # again: the build may have taken a while
    old = None
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        _rename(out, old, out)
    _rename(tmp, out, out)
    fd = os.open(out.parent, os.O_RDONLY)  # make the rename durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rename(src: Path, dst: Path, out: Path) -> None:
    """os.replace; a refusal of the kernel (busy, another filesystem) as InvalidArgument naming OUT."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.EXDEV, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise
        raise InvalidArgument(f"output {out} must be replaceable by renaming {src} onto {dst}, got "
                              f"{e.strerror} (is OUT or its parent a mount point?)") from None


def write_synced(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def collect_documents(documents: Iterable[np.ndarray], vocab_size: int) -> tuple[np.ndarray, int]:
    """int32[num_positions]: the non-empty documents, each followed by -1; and their count."""
    sep = np.array([-1], np.int32)
    pieces: list[np.ndarray] = []
    n_positions = 0
    for i, doc in enumerate(documents):
        arr = _check_document(doc, vocab_size, i)
        if arr.size:
            pieces += (arr, sep)
            n_positions += arr.size + 1
            if n_positions > MAX_POSITIONS:
                raise InvalidArgument(f"corpus must have at most {MAX_POSITIONS} positions "
                                      "(tokens + documents), got more (use --max-tokens)")
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), len(pieces) // 2


def write_tokens(path: Path, tokens: np.ndarray) -> FileInfo:
    """Writes int32[num_positions] tokens (-1 = separator) as tokens.u24, in blocks."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, tokens.size, _WRITE_BLOCK):
            data = pack_u24(tokens[start:start + _WRITE_BLOCK])
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return FileInfo(tokens.size * TOKEN_WIDTH_BYTES, digest.hexdigest())


def _write_suffix_array(path: Path, tokens: np.ndarray, sorted_depth: int) -> FileInfo:
    """Builds the suffix array of int32[num_positions] tokens and writes it as uint32 LE."""
    from retriever import _core

    sa = _core.build_suffix_array(np.ascontiguousarray(tokens, np.int32), sorted_depth)  # uint32[num_suffixes]
    data = memoryview(np.ascontiguousarray(sa, dtype="<u4")).cast("B")  # no copy on little-endian hosts
    write_synced(path, data)
    return FileInfo(data.nbytes, hashlib.sha256(data).hexdigest())


def _make_manifest(name: str, tokenizer: TokenizerInfo, num_documents: int, sorted_depth: int,
                   files: dict[str, FileInfo], sources: Iterable[str], seconds: float) -> Manifest:
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    num_positions = files[TOKENS_FILE].bytes // TOKEN_WIDTH_BYTES
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, kind=KIND, name=name, tokenizer=tokenizer,
        num_tokens=num_positions - num_documents, num_documents=num_documents, num_positions=num_positions,
        num_suffixes=num_positions - num_documents, token_width_bytes=TOKEN_WIDTH_BYTES,
        sorted_depth=sorted_depth, files=files, sources=tuple(str(s) for s in sources),
        build=BuildInfo(created, __version__, round(seconds, 3)))


# ---------------------------------------------------------------- reading

def open_datastore(path: str | Path, expect_tokenizer: TokenizerInfo | None = None,
                   verify_checksums: bool = True) -> CorpusDatastore:
    """Validates the datastore at `path` and memory-maps it.

    Raises IndexFormatError (missing or corrupt files, unknown format or version,
    sizes or checksums not matching the manifest) or FailedPrecondition (built with a
    tokenizer other than `expect_tokenizer`, compared by sha256 and vocab size).
    """
    root = Path(path)
    manifest = read_manifest(root)
    if expect_tokenizer is not None:
        check_tokenizer(manifest, root, expect_tokenizer)
    check_files(root, manifest, verify_checksums)
    from retriever import _core

    try:
        index = _core.CorpusIndex(str(root / TOKENS_FILE), str(root / SA_FILE), manifest.num_positions,
                                  manifest.num_suffixes, manifest.sorted_depth)
    except ValueError as e:
        raise IndexFormatError(f"index {root}: {e}") from None
    return CorpusDatastore(root, manifest, index)


def check_files(root: Path, manifest: Manifest, verify_checksums: bool = True) -> None:
    """Checks each data file's size (and sha256) against the manifest; IndexFormatError if off."""
    for fname, info in manifest.files.items():
        p = root / fname
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise IndexFormatError(f"{p} must exist, got no such file") from None
        if size != info.bytes:
            raise IndexFormatError(f"{p} size must be {info.bytes} bytes, got {size} (truncated or replaced?)")
    if not verify_checksums:
        return
    names = list(manifest.files)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda n: file_sha256(root / n), names))
    for fname, digest in zip(names, digests):
        if digest != manifest.files[fname].sha256:
            raise IndexFormatError(f"{root / fname} sha256 must be {manifest.files[fname].sha256}, got {digest} "
                                   "(corrupt file)")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, hashed over an mmap in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for off in range(0, size, _HASH_CHUNK):
                    h.update(view[off:off + _HASH_CHUNK])
            finally:
                view.release()
    return h.hexdigest()


def read_tokens(ds: CorpusDatastore | str | Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Positions [start, stop) of the token file as int32 (-1 = separator)."""
    root = ds.path if isinstance(ds, CorpusDatastore) else Path(ds)
    n = os.path.getsize(root / TOKENS_FILE) // TOKEN_WIDTH_BYTES
    stop = n if stop is None else max(start, min(stop, n))
    if start < 0 or start > n:
        raise InvalidArgument(f"start must be in [0, {n}], got {start}")
    with open(root / TOKENS_FILE, "rb") as f:
        f.seek(start * TOKEN_WIDTH_BYTES)
        raw = f.read((stop - start) * TOKEN_WIDTH_BYTES)
    return unpack_u24(raw)  # int32[stop - start]


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    """int32[n] with -1 separators -> the complete documents (an unterminated tail is dropped)."""
    ends = np.flatnonzero(tokens == -1)
    starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else np.zeros(0, np.int64)
    return [tokens[s:e] for s, e in zip(starts, ends)]
