"""Slow pure-Python references of the C++ drafting core (retriever/csrc), for the tests.

Each mirrors the documented contract of its C++ twin, written for clarity, not speed.
Tokens are Python ints; SEP (-1) ends a document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

f32 = np.float32

SEP = -1
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class Trie:
    """Find-or-add trie in insertion order, like `Candidates`."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    root_mass: float = 0.0
    match_length: int = 0
    occurrences: int = 0
    count: list[int] = field(default_factory=list)  # occurrences through each node

    def add_child(self, parent: int, token: int, m: float, max_nodes: int = 1 << 31) -> int:
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if p == parent and t == token:
                self.mass[i] += m
                self.count[i] += 1
                return i
        if len(self.tokens) >= max_nodes:
            return -1
        self.tokens.append(token)
        self.parents.append(parent)
        self.count.append(1)
        self.mass.append(m)  # += keeps the type of m: float32 in build_tree
        return len(self.tokens) - 1

    def add_path(self, path: list[int], m: float, max_nodes: int) -> None:
        node = -1
        for t in path:
            node = self.add_child(node, t, m, max_nodes)
            if node < 0:
                return


def suffix_key(tokens: list[int], i: int, depth: int) -> tuple:
    """First `depth` symbols of the suffix at i; a separator ends it and sorts lowest."""
    key = []
    for j in range(i, min(i + depth, len(tokens))):
        key.append(tokens[j])
        if tokens[j] == SEP:
            break
    return tuple(key)


class OnlineRef:
    """OnlineIndex: a token log of documents with whole-document eviction over budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.docs: list[list[int]] = []  # closed documents, oldest first
        self.open: list[int] | None = None

    def append(self, tokens: list[int]) -> None:
        self.open = (self.open or []) + list(tokens)

    def end_document(self) -> None:
        if self.open is None:
            return
        self.docs.append(self.open)
        self.open = None
        while sum(map(len, self.docs)) > self.budget and self.docs:
            self.docs.pop(0)

    def _live(self) -> list[list[int]]:
        return self.docs + ([self.open] if self.open is not None else [])

    def query(self, ctx: list[int], max_match: int, max_depth: int, max_occurrences: int,
              max_nodes: int, exponent: float) -> Trie:
        # Global positions: documents in order; each closed document owns one more slot (its separator).
        ends = []  # (doc, index in doc) of every token, newest last
        for d, doc in enumerate(self._live()):
            ends.extend((d, i) for i in range(len(doc)))
        live = self._live()
        found: list[tuple[int, int]] = []
        tail = min(len(ctx), LADDER[-1])
        for length in sorted((L for L in LADDER if L <= tail and L <= max_match), reverse=True):
            for d, i in reversed(ends):
                if len(found) >= max_occurrences:
                    break
                doc = live[d]
                if i + 1 >= len(doc) or i - length + 1 < 0 or (d, i) in found:
                    continue
                if doc[i - length + 1:i + 1] == ctx[len(ctx) - length:]:
                    found.append((d, i))
        return self._trie(found, ctx, max_match, max_depth, max_nodes, exponent)

    def _trie(self, found, ctx, max_match, max_depth, max_nodes, exponent) -> Trie:
        live = self._live()
        scored = []
        for order, (d, i) in enumerate(found):
            doc, m = live[d], 0
            while m < max_match and m < len(ctx) and i - m >= 0 and doc[i - m] == ctx[len(ctx) - 1 - m]:
                m += 1
            scored.append((-m, order, d, i, m))
        trie = Trie()
        for _, _, d, i, m in sorted(scored):
            w = float(m) ** exponent
            trie.match_length = max(trie.match_length, m)
            trie.root_mass += w
            trie.occurrences += 1
            trie.add_path(live[d][i + 1:i + 1 + max_depth], w, max_nodes)
        return trie


def corpus_query(tokens: list[int], ctx: list[int], sorted_depth: int, max_match: int, max_depth: int,
                 max_occurrences: int, max_nodes: int) -> Trie:
    """CorpusIndex.query over `tokens` (documents each followed by SEP)."""
    positions = [i for i, t in enumerate(tokens) if t != SEP]
    order = sorted(positions, key=lambda i: suffix_key(tokens, i, sorted_depth))
    best, occ = 0, []
    for length in range(1, min(len(ctx), max_match, sorted_depth) + 1):
        hits = [i for i in order if tuple(tokens[i:i + length]) == tuple(ctx[len(ctx) - length:])]
        if not hits:
            break
        best, occ = length, hits
    trie = Trie(match_length=best)
    if best == 0 or max_occurrences <= 0:
        return Trie()
    count = len(occ)
    samples = min(count, max_occurrences)
    w = count / samples
    for j in range(samples):
        start = occ[(2 * j + 1) * count // (2 * samples)] + best
        if start >= len(tokens) or tokens[start] == SEP:
            continue
        trie.root_mass += w
        trie.occurrences += 1
        path = []
        for t in tokens[start:start + max_depth]:
            if t == SEP:
                break
            path.append(t)
        trie.add_path(path, w, max_nodes)
    return trie


def per_source(max_nodes: int) -> int:
    """How many of its best nodes each source brings to the merge: 1.25 * max_nodes, rounded up."""
    keep = max(max_nodes, 0)
    return keep + (keep + 3) // 4


def build_tree(sources: list[tuple[Trie, float, float, int, bool]], max_nodes: int, min_score: float):
    """build_tree: (tokens, parents, scores, sources) of the best nodes of the merged tries.
    sources: (trie, reliability, half_match, source id, counted once: max with the score so far)."""
    merged = Trie()
    best: list[tuple[float, int]] = []  # (largest contribution, source id)
    for trie, reliability, half_match, source_id, once in sources:
        if not trie.tokens or trie.root_mass <= 0 or trie.match_length <= 0:
            continue
        m = trie.match_length  # float32 arithmetic, in the core's order
        scale = f32(f32(f32(reliability) * f32(m)) / f32(f32(m) + f32(half_match))) / f32(trie.root_mass)
        ranked = sorted(range(len(trie.tokens)), key=lambda i: (-trie.mass[i], i))
        kept = set(ranked[:per_source(max_nodes)])  # each source's heaviest nodes
        local = []
        for i, (t, p, mass) in enumerate(zip(trie.tokens, trie.parents, trie.mass)):
            if i not in kept or (p >= 0 and local[p] < 0):
                local.append(-1)
                continue
            c = f32(scale * f32(mass))
            v = merged.add_child(-1 if p < 0 else local[p], t, f32(0) if once else c)
            if once:
                merged.mass[v] = max(merged.mass[v], c)
            local.append(v)
            if v == len(best):
                best.append((c, source_id))
            elif c > best[v][0]:
                best[v] = (c, source_id)
    score = list(merged.mass)
    for v, p in enumerate(merged.parents):
        score[v] = min(score[v], f32(1.0) if p < 0 else score[p])
    order = sorted(range(len(score)), key=lambda v: (-score[v], v))[:max_nodes]
    out_t, out_p, out_s, out_src, position = [], [], [], [], {}
    for v in order:
        if score[v] < min_score:
            break
        position[v] = len(out_t)
        out_t.append(merged.tokens[v])
        out_p.append(-1 if merged.parents[v] < 0 else position[merged.parents[v]])
        out_s.append(score[v])
        out_src.append(best[v][1])
    return out_t, out_p, out_s, out_src


# ---------------------------------------------------------------- calibrated scoring

E_LOW = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49)
MAX_SOURCE_PROB = f32(0.999)


def calib_cell(e: int, share, support: int) -> int:
    """The calibration cell of core.h: (e bucket, share bin, support bin)."""
    eb = max(i for i, lo in enumerate(E_LOW) if e >= lo) if e >= 1 else 0
    sb = 4 if share >= f32(0.999) else min(3, max(0, int(f32(share) * f32(4.0))))
    nb = 0 if support <= 1 else 1 if support == 2 else 2 if support <= 4 else 3 if support <= 8 else 4
    return (eb * 5 + sb) * 5 + nb


def build_tree_calibrated(sources: list[tuple[Trie, int, int, bool]], calib, max_nodes: int, min_score: float):
    """Calibrated build_tree: sources are (trie, calib row, source id, counted once: max with the
    score so far, not noisy-OR); calib float32 [R, C]. Returns (tokens, parents, scores, sources,
    flat cells)."""
    merged = Trie()
    rest: list[float] = []  # merged: prod over sources of (1 - P_s)
    best: list[tuple[float, int, int]] = []  # (largest P_s, source id, flat cell)
    for trie, row, source_id, once in sources:
        if not trie.tokens or trie.root_mass <= 0 or trie.match_length <= 0:
            continue
        prob, depth, cells = [], [], []
        for i, (p, mass) in enumerate(zip(trie.parents, trie.mass)):
            parent_mass = f32(trie.root_mass) if p < 0 else f32(trie.mass[p])
            depth.append(1 if p < 0 else depth[p] + 1)
            share = f32(f32(mass) / parent_mass) if parent_mass > 0 else f32(0)
            cells.append(calib_cell(trie.match_length + depth[i] - 1, share, trie.occurrences if p < 0 else trie.count[p]))
            prob.append(f32((f32(1) if p < 0 else prob[p]) * f32(calib[row][cells[i]])))
        kept = set(sorted(range(len(prob)), key=lambda i: (-prob[i], i))[:per_source(max_nodes)])
        local: list[int] = []
        for i, (t, p) in enumerate(zip(trie.tokens, trie.parents)):
            if i not in kept or (p >= 0 and local[p] < 0):
                local.append(-1)
                continue
            c = min(prob[i], MAX_SOURCE_PROB)
            v = merged.add_child(-1 if p < 0 else local[p], t, f32(0))
            local.append(v)
            flat = row * len(calib[row]) + cells[i]
            if v == len(best):
                rest.append(f32(f32(1) - c))
                best.append((c, source_id, flat))
            else:
                rest[v] = min(rest[v], f32(f32(1) - c)) if once else f32(rest[v] * f32(f32(1) - c))
                if c > best[v][0]:
                    best[v] = (c, source_id, flat)
    score = [f32(f32(1) - r) for r in rest]
    for v, p in enumerate(merged.parents):
        score[v] = min(score[v], f32(1.0) if p < 0 else score[p])
    order = sorted(range(len(score)), key=lambda v: (-score[v], v))[:max_nodes]
    out: tuple[list, ...] = ([], [], [], [], [])
    position = {}
    for v in order:
        if score[v] < min_score:
            break
        position[v] = len(out[0])
        parent = -1 if merged.parents[v] < 0 else position[merged.parents[v]]
        for column, x in zip(out, (merged.tokens[v], parent, score[v], best[v][1], best[v][2])):
            column.append(x)
    return out


def tested_outcomes(tokens: list[int], parents: list[int], new_tokens: list[int]) -> list[int]:
    """1 accepted, 0 rejected, -1 untested: node i is tested iff its parent is the root or an
    accepted node, at a depth within new_tokens; accepted iff its token is new_tokens[depth - 1]."""
    out, depth = [], []
    for t, p in zip(tokens, parents):
        d = 1 if p < 0 else (depth[p] + 1 if out[p] == 1 else 0)
        if d == 0 or d > len(new_tokens):
            out.append(-1)
            depth.append(0)
        else:
            out.append(1 if t == new_tokens[d - 1] else 0)
            depth.append(d)
    return out


def calib_observe(tokens, parents, cells, new_tokens, hits, trials, table, prior, strength, decay) -> None:
    """In place: each tested node's cell: hits, trials decayed then counted; table = posterior mean."""
    for i, o in enumerate(tested_outcomes(tokens, parents, new_tokens)):
        c = cells[i]
        if o < 0 or c < 0:
            continue
        hits[c] = hits[c] * decay + o
        trials[c] = trials[c] * decay + 1.0
        table[c] = f32(min(max((hits[c] + strength * float(prior[c])) / (trials[c] + strength), 1e-4), float(f32(0.999))))
