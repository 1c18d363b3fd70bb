"""Index benchmarks: corpus build rate and size on disk; online index memory per token.

- Build: `index_builder.build` over the given inputs into a temporary directory; the
  rate counts tokenization (tokens / wall seconds); bytes per token = all files of the
  datastore / corpus tokens (target <= 8).
- Online: N real tokens (a corpus datastore's first documents, else the traces' prompts
  and outputs, cycled) appended document by document into one `retriever._core.OnlineIndex`;
  `memory_bytes / num_tokens` (target <= 300) and the process RSS growth per token.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from specdraft.bench.replay import Trace

DISK_TARGET_B, ONLINE_TARGET_B = 8.0, 300.0
_WORST_AFTER_TOKENS = 1 << 16


@dataclass(frozen=True)
class BuildResult:
    inputs: tuple[str, ...]
    tokens: int
    documents: int
    seconds: float
    disk_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.disk_bytes / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class OnlineResult:
    source: str
    tokens: int
    documents: int
    memory_bytes: int  # OnlineIndex.memory_bytes
    rss_delta_bytes: int  # process RSS growth over the appends
    seconds: float
    worst_bytes_per_token: float  # max memory_bytes / num_tokens at document ends past 64K tokens

    @property
    def bytes_per_token(self) -> float:
        return self.memory_bytes / self.tokens if self.tokens else 0.0

    @property
    def rss_per_token(self) -> float:
        return self.rss_delta_bytes / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class IndexBenchResult:
    build: BuildResult | None
    online: OnlineResult

    def table(self) -> str:
        """The figures with their targets, one `name: value (target)` line each."""
        lines = ["Index benchmark"]
        if self.build:
            b = self.build
            lines += [
                f"  corpus: {', '.join(b.inputs)}: {b.tokens:,} tokens in {b.documents:,} documents",
                f"  build rate (tokenization included): {b.tokens_per_s:,.0f} tokens/s ({b.seconds:.1f} s)",
                f"  on disk: {b.disk_bytes:,} bytes = {b.bytes_per_token:.2f} B/token "
                f"(target <= {DISK_TARGET_B:g}: {'met' if b.bytes_per_token <= DISK_TARGET_B else 'NOT met'})",
            ]
        o = self.online
        lines += [
            f"  online index: {o.tokens:,} tokens of {o.source} in {o.documents:,} documents, "
            f"appended at {o.tokens / o.seconds if o.seconds else 0:,.0f} tokens/s",
            f"  online memory_bytes: {o.memory_bytes:,} = {o.bytes_per_token:.1f} B/token "
            f"(target <= {ONLINE_TARGET_B:g}: {'met' if o.bytes_per_token <= ONLINE_TARGET_B else 'NOT met'})",
            f"  online memory_bytes worst over the run (after 64K tokens): {o.worst_bytes_per_token:.1f} B/token",
            f"  online RSS growth: {o.rss_delta_bytes:,} = {o.rss_per_token:.1f} B/token",
        ]
        return "\n".join(lines)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_build(inputs: Sequence[str], tokenizer: str, **options) -> BuildResult:
    """Builds a datastore of `inputs` into a temporary directory and times it.

    `options` go to `index_builder.build` unchanged (e.g. glob, exclude_ids).
    """
    from index_builder import build

    with tempfile.TemporaryDirectory(prefix="specdraft-bench-") as tmp:
        out = Path(tmp) / "index"
        start = time.perf_counter()  # tokenizer loading and tokenization included
        report = build.build(list(inputs), tokenizer=tokenizer, out_dir=out, progress=False, **options)
        seconds = time.perf_counter() - start
        disk = _dir_bytes(out)
    return BuildResult(tuple(str(i) for i in inputs), int(report.num_tokens), int(report.num_documents),
                       seconds, disk)


def datastore_documents(index_dir: str | Path, max_tokens: int) -> Iterator[np.ndarray]:
    """The first documents (int32 arrays) of a datastore, about `max_tokens` tokens in all."""
    from retriever.store.datastore import read_tokens, split_documents

    window = read_tokens(index_dir, 0, max_tokens + max_tokens // 4 + 65_536)  # int32, -1 separators
    taken = 0
    for doc in split_documents(window):
        if taken >= max_tokens:
            return
        if len(doc):
            yield doc
            taken += len(doc)


def trace_documents(traces: dict[str, list[Trace]], max_tokens: int) -> Iterator[np.ndarray]:
    """The traces' prompts and outputs as documents, cycled until `max_tokens` tokens."""
    docs = [d for group in traces.values() for t in group for d in (t.prompt_ids, t.output_ids) if len(d)]
    if not docs:
        raise ValueError("traces must hold at least one non-empty prompt or output")
    taken = 0
    while taken < max_tokens:
        for doc in docs:
            yield doc
            taken += len(doc)
            if taken >= max_tokens:
                return


def bench_online(documents: Iterator[np.ndarray], source: str, step_tokens: int = 8) -> OnlineResult:
    """Appends `documents` into one OnlineIndex (no eviction), `step_tokens` per append.

    Appending a few tokens at a time mirrors a session receiving accepted tokens.
    """
    from retriever import _core

    docs = [np.ascontiguousarray(d, dtype=np.int32) for d in documents]  # materialized before measuring
    total = sum(len(d) for d in docs)
    rss0 = _rss_bytes()
    index = _core.OnlineIndex(max(total, 1))
    worst = 0.0
    seconds = 0.0
    for doc in docs:
        start = time.perf_counter()
        for i in range(0, len(doc), step_tokens):
            index.append(doc[i : i + step_tokens])
        index.end_document()
        seconds += time.perf_counter() - start
        if index.num_tokens >= _WORST_AFTER_TOKENS:  # capacities double: the ratio saw-tooths
            worst = max(worst, index.memory_bytes / index.num_tokens)
    rss = _rss_bytes() - rss0
    return OnlineResult(source, int(index.num_tokens), int(index.num_documents), int(index.memory_bytes), rss,
                        seconds, worst)
