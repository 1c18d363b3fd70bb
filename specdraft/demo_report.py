"""The demo's rows and what it writes: the table (stdout), a JSON file and a PNG chart.

A `DemoRow` holds one prompt's runs: plain first, then the anchors, specdraft last. Speedups are
ratios of decode rates (`Run.decode_tok_s`: tokens after the first step per second after it), the
end-to-end speedup a ratio of tokens per second over the whole request: the run's time, plus
`prefill_s` where plain and specdraft started from one shared prefill (a backend keeping the
prompt's cache). Where specdraft's output parts from plain's, `divergence` says where, and the plain
run's top-2 logit margin there (a near-tie of the backend's batched decode, or not). Example: plain 16 tok/s,
llama.cpp lookup 10 / 16 at 14 / 19 tok/s, specdraft 40 tok/s -> 2.50x plain, 2.11x the best lookup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from specdraft.demo_runs import PLAIN, SPECDRAFT, Run
from specdraft.demo_workloads import DemoPrompt

if TYPE_CHECKING:
    from verifier.decoding.divergence import Divergence


@dataclass(frozen=True)
class DemoRow:
    prompt: DemoPrompt
    prompt_tokens: int
    runs: tuple[Run, ...]  # plain, the anchors, specdraft
    prefill_s: float = 0.0  # the prompt's prefill shared by plain and specdraft (0: each run prefilled)
    divergence: "Divergence | None" = None  # where specdraft's output first parts from plain's (None: it does not)

    def run(self, method: str) -> Run:
        return next(r for r in self.runs if r.method == method)

    @property
    def anchors(self) -> tuple[Run, ...]:
        return tuple(r for r in self.runs if r.method not in (PLAIN, SPECDRAFT))

    def speedup(self, method: str = SPECDRAFT) -> float:
        """Decode rate of `method` over plain decoding's."""
        return _ratio(self.run(method).decode_tok_s, self.run(PLAIN).decode_tok_s)

    def over_best_anchor(self) -> float:
        """specdraft's decode rate over the fastest anchor's (0: no anchors)."""
        best = max((r.decode_tok_s for r in self.anchors), default=0.0)
        return _ratio(self.run(SPECDRAFT).decode_tok_s, best)

    def e2e_speedup(self) -> float:
        """specdraft's tokens per second over plain's, prefill included (the shared one counted in both)."""
        draft, plain = self.run(SPECDRAFT), self.run(PLAIN)
        return _ratio(_ratio(len(draft.token_ids), draft.total_s + self.prefill_s),
                      _ratio(len(plain.token_ids), plain.total_s + self.prefill_s))

    def same_as_plain(self, method: str) -> bool:
        return self.run(method).token_ids == self.run(PLAIN).token_ids


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def table(rows: list[DemoRow]) -> str:
    """One line per row: tokens, decode tok/s of each method, specdraft's MAT and speedups, same output."""
    methods = [r.method for r in rows[0].runs] if rows else []
    short = {m: m.replace("llama.cpp ", "").replace(" ", "") for m in methods}
    head = (f"{'row':<13} {'tokens':>6} " + " ".join(f"{short[m] + ' tok/s':>15}" for m in methods)
            + f" {'MAT':>5} {'x plain':>7} {'x lookup':>8} {'e2e x':>6}  same output")
    lines = [head, "-" * len(head)]
    for row in rows:
        draft = row.run(SPECDRAFT)
        differ = [short[a.method] for a in row.anchors if not row.same_as_plain(a.method)]
        same = _same(row) + (f" ({', '.join(differ)} differ)" if differ else "")
        lines.append(f"{row.prompt.name:<13} {len(draft.token_ids):>6} "
                     + " ".join(f"{row.run(m).decode_tok_s:>15.1f}" for m in methods)
                     + f" {draft.mat or 0:>5.2f} {row.speedup():>6.2f}x {row.over_best_anchor():>7.2f}x "
                       f"{row.e2e_speedup():>5.2f}x  {same}")
    return "\n".join(lines)


def _same(row: DemoRow) -> str:
    """'yes'; 'near-tie at token 37 (margin 0.12)' where specdraft parts from plain at a near-tie of
    plain's logits; 'NO at token 37 (margin 3.20)' where it does not; 'NO' where no replay told."""
    if row.same_as_plain(SPECDRAFT):
        return "yes"
    d = row.divergence
    if d is None:
        return "NO"
    return f"{'near-tie' if d.near_tie else 'NO'} at token {d.position} (margin {d.margin:.2f})"


def _divergence_json(d: "Divergence | None") -> dict | None:
    return None if d is None else {"position": d.position, "plain_token": d.plain_token, "other_token": d.other_token,
                                   "plain_top2_logits": [round(x, 4) for x in d.best],
                                   "margin": round(d.margin, 4), "near_tie": d.near_tie}


def _run_json(row: DemoRow, run: Run) -> dict:
    return {"method": run.method, "new_tokens": len(run.token_ids), "steps": run.steps, "mat": run.mat,
            "first_s": round(run.first_s, 4), "total_s": round(run.total_s, 4),
            "decode_tok_s": round(run.decode_tok_s, 2), "e2e_tok_s": round(run.e2e_tok_s, 2),
            "speedup": round(row.speedup(run.method), 3), "same_as_plain": row.same_as_plain(run.method)}


def write_json(rows: list[DemoRow], path: Path, header: dict) -> None:
    """`header` (model, backend, threads, load average, ...) and one object per row."""
    doc = dict(header, rows=[{
        "name": r.prompt.name, "workload": r.prompt.workload, "kind": r.prompt.kind,
        "prompt_tokens": r.prompt_tokens, "max_new_tokens": r.prompt.max_new_tokens, "prefill_s": round(r.prefill_s, 3),
        "speedup": round(r.speedup(), 3), "over_best_lookup": round(r.over_best_anchor(), 3),
        "e2e_speedup": round(r.e2e_speedup(), 3), "divergence": _divergence_json(r.divergence),
        "runs": [_run_json(r, run) for run in r.runs]} for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def chart(rows: list[DemoRow], out: Path, title: str) -> None:
    """Left: decode tokens/s of every method per row; right: speedup over plain, specdraft's MAT on its bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r.method for r in rows[0].runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    width, xs = 0.8 / len(methods), range(len(rows))
    for k, m in enumerate(methods):
        pos = [x + (k - (len(methods) - 1) / 2) * width for x in xs]
        left.bar(pos, [r.run(m).decode_tok_s for r in rows], width, label=m, color=f"C{k}")
        if m == PLAIN:
            continue
        bars = right.bar(pos, [r.speedup(m) for r in rows], width, label=m, color=f"C{k}")
        if m == SPECDRAFT:
            for bar, r in zip(bars, rows):
                right.annotate(f"MAT {r.run(m).mat or 0:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                               ha="center", va="bottom", fontsize=7)
    for ax in (left, right):
        ax.set_xticks(list(xs), [r.prompt.name for r in rows], rotation=20, fontsize=8)
        ax.legend(fontsize=7)
    left.set(title="Decode speed (tokens/s after the first token)", ylabel="tokens/s")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set(title="Speedup over plain decoding", ylabel="speedup (x)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
