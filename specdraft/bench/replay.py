"""MAT replay of the greedy reference traces (`../shared/traces/README.md`).

Greedy decoding makes acceptance exact without a model: at each step the drafter sees
prompt + accepted output and proposes a tree; the longest root path whose tokens equal
the true continuation is accepted, plus one bonus token (none past the output's end).
MAT = output tokens / steps. Requests are replayed in id order within a workload, one
session per request; each finished output becomes a prior output of the workload's own
tenant (EndSession), so workloads never share prior outputs.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from specdraft.bench.backends import Backend, Session

DEFAULT_TRACES = "../shared/traces/dev.jsonl"
WORKLOADS = ("code", "refactor", "tests", "chat")
# Suffix-tree drafting, tuned (ArcticInference), at most 64 draft tokens per step.
ANCHOR_MAT = {"code": 2.87, "refactor": 10.20, "tests": 6.42, "chat": 1.58}


@dataclass(frozen=True)
class Trace:
    """One greedy reference generation: `output_ids` followed `prompt_ids`."""

    id: str
    workload: str
    prompt_ids: np.ndarray  # int32[p]
    output_ids: np.ndarray  # int32[o]


def load_traces(
    path: str | Path, workloads: Sequence[str] | None = None, limit: int | None = None
) -> dict[str, list[Trace]]:
    """Traces of the JSONL file `path`, grouped by workload and sorted by id.

    Groups come in WORKLOADS order (others after, by name); `workloads` keeps only
    those named; `limit` keeps the first `limit` requests (in id order) of each.
    Raises FileNotFoundError / ValueError on a missing file or a malformed line.
    """
    groups: dict[str, list[Trace]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                trace = Trace(
                    id=str(row["id"]),
                    workload=str(row["workload"]),
                    prompt_ids=np.asarray(row["prompt_ids"], dtype=np.int32),
                    output_ids=np.asarray(row["output_ids"], dtype=np.int32),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed trace: {e}") from e
            if workloads is None or trace.workload in workloads:
                groups.setdefault(trace.workload, []).append(trace)
    order = {w: i for i, w in enumerate(WORKLOADS)}
    names = sorted(groups, key=lambda w: (order.get(w, len(order)), w))
    return {w: sorted(groups[w], key=lambda t: t.id)[:limit] for w in names}


def accepted_length(token_ids: Iterable[int], parents: Iterable[int], continuation: Iterable[int]) -> int:
    """Length of the longest root path of a draft tree equal to a prefix of `continuation`.

    Node i proposes token_ids[i] after parents[i] (-1: after the root). Contract:
    parents[i] == -1 or 0 <= parents[i] < i, else ValueError. Returns 0..len(continuation).
    """
    toks = np.asarray(token_ids).tolist()
    pars = np.asarray(parents).tolist()
    cont = np.asarray(continuation).tolist()
    if len(toks) != len(pars):
        raise ValueError(f"token_ids and parents must have one length, got {len(toks)} and {len(pars)}")
    depth = [0] * len(toks)  # path length of a node on the continuation, 0 = off it
    best = 0
    for i, (tok, par) in enumerate(zip(toks, pars)):
        if par == -1:
            d = 1
        elif 0 <= par < i:
            d = depth[par] + 1 if depth[par] else 0
        else:
            raise ValueError(f"parents[{i}] must be -1 or in [0, {i}), got {par}")
        if d and d <= len(cont) and cont[d - 1] == tok:
            depth[i] = d
            best = max(best, d)
    return best


@dataclass(frozen=True)
class RequestResult:
    """One request's replay: `steps` draft calls produced `output_tokens`."""

    id: str
    output_tokens: int
    steps: int
    draft_nodes: int  # sum over the steps of the tree sizes


def replay_request(session: Session, trace: Trace, max_nodes: int) -> RequestResult:
    """Replays one generation through `session`, then ends it (its output becomes prior).

    Step: draft on prompt + accepted output; accept the longest matching root path plus
    one bonus token; send those as the next call's new_tokens. The last step's tokens
    are handed over by `session.end` before the session ends.
    """
    out = trace.output_ids
    pos = steps = nodes = 0
    prompt: np.ndarray | None = trace.prompt_ids
    new = out[:0]
    while pos < len(out):
        tree = session.draft(prompt, new, max_nodes)
        prompt = None
        accepted = accepted_length(tree.token_ids, tree.parents, out[pos:])
        new = out[pos : pos + accepted + 1]
        pos += len(new)
        steps += 1
        nodes += len(tree.token_ids)
    if steps:
        session.end(new)
    return RequestResult(trace.id, int(len(out)), steps, nodes)


@dataclass(frozen=True)
class WorkloadResult:
    """Totals of one workload's replay and its MAT against the anchor."""

    workload: str
    requests: int
    output_tokens: int
    steps: int
    draft_nodes: int

    @property
    def mat(self) -> float:
        """Mean accepted tokens per step (drafted + bonus)."""
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def anchor(self) -> float | None:
        return ANCHOR_MAT.get(self.workload)

    @property
    def ratio(self) -> float | None:
        return self.mat / self.anchor if self.anchor else None

    @property
    def mean_nodes(self) -> float:
        return self.draft_nodes / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class ReplayResult:
    """A replay of every selected workload through one backend."""

    backend: str
    max_nodes: int
    indexes: tuple[str, ...]
    workloads: tuple[WorkloadResult, ...]
    seconds: float

    def table(self) -> str:
        """The MAT table as aligned plain text (markdown-compatible)."""
        head = ("workload", "requests", "output tokens", "steps", "MAT", "anchor", "ratio", "nodes/step")
        rows = [head]
        for w in self.workloads:
            rows.append((
                w.workload, str(w.requests), str(w.output_tokens), str(w.steps), f"{w.mat:.2f}",
                f"{w.anchor:.2f}" if w.anchor else "-", f"{w.ratio:.2f}x" if w.ratio else "-",
                f"{w.mean_nodes:.1f}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
        title = (f"MAT replay: backend={self.backend} max_nodes={self.max_nodes} "
                 f"indexes={list(self.indexes) or 'none'} ({self.seconds:.1f} s)")
        return "\n".join([title, *lines])


def replay(
    backend: Backend,
    traces: dict[str, list[Trace]],
    max_nodes: int = 64,
    indexes: Sequence[str] = (),
    progress: bool = False,
) -> ReplayResult:
    """Replays every workload of `traces` through `backend`, each under its own tenant.

    Tenants are `bench-<workload>-<run nonce>`, so a long-running server keeps runs apart.
    """
    nonce = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    results = []
    for workload, group in traces.items():
        tenant = f"bench-{workload}-{nonce}"
        totals = [0, 0, 0]
        for trace in tqdm(group, desc=workload, unit="req", disable=None if progress else True, leave=False):
            r = replay_request(backend.session(tenant, trace.id), trace, max_nodes)
            totals = [totals[0] + r.output_tokens, totals[1] + r.steps, totals[2] + r.draft_nodes]
        results.append(WorkloadResult(workload, len(group), *totals))
    seconds = time.perf_counter() - start
    return ReplayResult(backend.name, max_nodes, tuple(indexes), tuple(results), seconds)
