"""Source ablation: replayed MAT by workload and in-process draft latency per configuration.

Each configuration is a fresh in-process `Drafter` (the default server's settings) with some
sources on or off and calibrated or heuristic scoring, replayed over the traces
(`replay.py`); the latency is the wall time of every `Drafter.draft` call of that replay.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from retriever.drafting.types import DEFAULT_SOURCES, Source
from specdraft.bench.backends import InProcessBackend, open_indexes
from specdraft.bench.latency import _Recorder
from specdraft.bench.replay import ANCHOR_MAT, Trace, replay

_ON = DEFAULT_SOURCES


@dataclass(frozen=True)
class AblationConfig:
    """One configuration: the sources drafted from and the scoring."""

    name: str
    sources: frozenset
    calibrate: bool


CONFIGS = (
    AblationConfig("fused (calibrated, default)", _ON, True),
    AblationConfig("fused, heuristic scoring", _ON, False),
    AblationConfig("no context", _ON - {Source.CONTEXT}, True),
    AblationConfig("no tenant", _ON - {Source.TENANT}, True),
    AblationConfig("no corpus", _ON - {Source.CORPUS}, True),
    AblationConfig("+ reference set", _ON | {Source.REFERENCE}, True),
    AblationConfig("context only", frozenset({Source.CONTEXT}), True),
)


@dataclass(frozen=True)
class AblationRow:
    config: str
    sources: tuple[str, ...]
    calibrate: bool
    mat: dict  # workload -> MAT
    p50_us: float
    p99_us: float


@dataclass(frozen=True)
class AblationResult:
    indexes: tuple[str, ...]
    max_nodes: int
    rows: tuple[AblationRow, ...]

    def table(self) -> str:
        """MAT by workload (anchor row first) and latency per configuration, as markdown."""
        workloads = list(self.rows[0].mat) if self.rows else []
        head = ("configuration", *workloads, "p50 (us)", "p99 (us)")
        rows = [head, ("anchor x 1.2", *(f"{1.2 * ANCHOR_MAT[w]:.2f}" if w in ANCHOR_MAT else "-"
                                         for w in workloads), "-", "-")]
        rows += [(r.config, *(f"{r.mat[w]:.2f}" for w in workloads), f"{r.p50_us:.1f}", f"{r.p99_us:.1f}")
                 for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
        title = f"Source ablation: max_nodes={self.max_nodes} indexes={list(self.indexes) or 'none'}"
        return "\n".join([title, *lines])


def run_config(config: AblationConfig, corpora: list, traces: dict[str, list[Trace]], max_nodes: int) -> AblationRow:
    """Replays `traces` through a fresh drafter configured as `config`."""
    from retriever.drafting.drafter import Drafter
    from retriever.service.settings import RetrieverSettings

    base = RetrieverSettings().drafter_config()
    drafter = Drafter(dataclasses.replace(base, sources=config.sources, calibrate=config.calibrate), corpora)
    recorder = _Recorder(InProcessBackend(drafter))
    result = replay(recorder, traces, max_nodes)
    ns = np.asarray([x for s in recorder.sessions for x in s.latencies_ns], np.int64)
    p50, p99 = (np.percentile(ns, [50, 99]) / 1e3).tolist() if len(ns) else (float("nan"),) * 2
    names = tuple(s.name.lower() for s in sorted(config.sources))
    return AblationRow(config.name, names, config.calibrate, {w.workload: w.mat for w in result.workloads}, p50, p99)


def run_ablation(traces: dict[str, list[Trace]], indexes: Sequence[str] = (), max_nodes: int = 64,
                 configs: Sequence[AblationConfig] = CONFIGS) -> AblationResult:
    """Every configuration over the same corpora and traces."""
    corpora = open_indexes(indexes)
    rows = []
    for config in configs:
        t0 = time.perf_counter()
        rows.append(run_config(config, corpora, traces, max_nodes))
        print(f"  {config.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return AblationResult(tuple(indexes), max_nodes, tuple(rows))
