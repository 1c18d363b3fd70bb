"""`specdraft bench generate`: end-to-end tokens/s with and without drafting, by workload.

The dev traces' prompts are decoded with the traces' tokenizer (Qwen2.5-Coder) and
re-generated greedily by the model under test: raw prompts as text, chat prompts as their
user message under the model's own chat template. For each prompt, in one process and on one
device: plain decoding (`Engine`, no drafter), speculative decoding (`Engine` drafting from an
in-process `Drafter`: the prompt, the workload's earlier outputs, optional datastores built
with the model's tokenizer), and the anchors. With `--backend hf`: HF transformers' own
`generate` plain and with prompt lookup (`prompt_lookup_num_tokens=10`); speedups are over plain
HF greedy when it runs, else over the engine's plain decoding. With `--backend llama.cpp` (the
engine's plain decoding is llama.cpp's own one-token decode on the same GGUF file): llama.cpp's
prompt lookup (`llama_cpp.llama_speculative.LlamaPromptLookupDecoding` through `Llama(...,
draft_model=..., logits_all=True)`) at its default (10 predicted tokens) and at 16, in the
"anchor" columns; speedups are over the engine's plain decoding.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from specdraft.bench.replay import Trace

_USER = "<|im_start|>user\n"
_END = "<|im_end|>"


@dataclass(frozen=True)
class Prompt:
    id: str
    workload: str
    text: str
    chat: bool  # text is a user message (rendered with the model's chat template)


@dataclass(frozen=True)
class WorkloadSpeed:
    workload: str
    prompts: int
    new_tokens: int  # speculative run, all prompts
    steps: int
    plain_tok_s: float  # engine without a drafter
    draft_tok_s: float  # engine drafting from the retriever
    hf_tok_s: float  # anchor 1: HF generate greedy, or llama.cpp prompt lookup (10 tokens) (0: not run)
    lookup_tok_s: float  # anchor 2: HF generate with prompt lookup, or llama.cpp prompt lookup (16) (0: not run)
    same_output: bool  # speculative output == plain output on every prompt
    margins: tuple[float, ...] = ()  # per differing prompt: the plain run's top-2 logit margin where they part

    @property
    def mat(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    backend: str = "hf"

    def speedup(self, tok_s: float) -> float:
        base = (self.hf_tok_s if self.backend == "hf" else 0.0) or self.plain_tok_s
        return tok_s / base if base else 0.0


def prompts_of(traces: Sequence[Trace], tokenizer_path: str) -> list[Prompt]:
    """The traces' prompts as text; chat prompts reduced to their (last) user message."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_path) / "tokenizer.json")
                              if Path(tokenizer_path).is_dir() else tokenizer_path)
    out = []
    for t in traces:
        text = tok.decode(t.prompt_ids.tolist(), skip_special_tokens=False)
        chat = _USER in text
        if chat:
            text = text.rsplit(_USER, 1)[1].split(_END, 1)[0]
        out.append(Prompt(t.id, t.workload, text, chat))
    return out


def prompt_ids(prompt: Prompt, tokenizer) -> list[int]:
    if not prompt.chat:
        return list(tokenizer.encode(prompt.text))
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def fresh_prefill(backend) -> None:
    """A backend keeping the prompt's cache (llama.cpp) forgets it: each timed run pays its own
    prefill, as the anchors do (they reset), so no run gains one another paid for."""
    if getattr(backend, "keeps_prefix", False):
        backend.forget()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def hf_generate(loaded, ids: list[int], max_new_tokens: int, **kwargs) -> tuple[list[int], float]:
    import torch

    x = torch.tensor([ids], device=loaded.device)
    with torch.inference_mode():
        out, s = _timed(lambda: loaded.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                       max_new_tokens=max_new_tokens, **kwargs))
    return out[0, len(ids):].tolist(), s


def llama_lookup(llm, ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
    """llama.cpp's own greedy generation (with the draft model its Llama object was made with):
    (tokens, seconds, seconds to the first token)."""
    out: list[int] = []
    first: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(int(t))
            if not first:
                first.append(time.perf_counter() - t0)
            if len(out) >= max_new_tokens or llm.token_eos() == t:
                return
    seconds = _timed(run)[1]
    return out, seconds, first[0] if first else seconds


def llama_lookup_model(model_path: str, threads: int, num_pred_tokens: int = 10, n_ctx: int = 4096):
    """A `llama_cpp.Llama` over the GGUF file drafting by prompt lookup (`num_pred_tokens` predicted tokens;
    10 is its default). It holds n_ctx x vocab float32 logits (`logits_all`, which the lookup needs)."""
    import os

    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    threads = threads or len(os.sched_getaffinity(0))
    return Llama(model_path=model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=True,
                 verbose=False, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=num_pred_tokens))


def llama_lookups(model_path: str, threads: int) -> tuple[object, object]:
    """Two `llama_lookup_model`s: 10 (its default) and 16 predicted tokens."""
    return tuple(llama_lookup_model(model_path, threads, n) for n in (10, 16))


def run_workload(engine, loaded, drafter, workload: str, prompts: list[Prompt], max_new_tokens: int,
                 hf: bool, lookups: tuple = ()) -> WorkloadSpeed:
    """Runs every prompt of one workload (tenant = workload: outputs feed later prompts' drafts)."""
    from verifier.decoding.divergence import first_divergence
    from verifier.drafting import LocalDraftSource

    totals = dict(plain=(0, 0.0), draft=(0, 0.0), hf=(0, 0.0), lookup=(0, 0.0))
    steps, same, margins = 0, True, []

    def add(key: str, tokens: int, seconds: float) -> None:
        n, s = totals[key]
        totals[key] = (n + tokens, s + seconds)

    for i, p in enumerate(prompts):
        ids = prompt_ids(p, loaded.tokenizer)
        fresh_prefill(engine.backend)
        plain, s = _timed(lambda: [t for r in engine.generate(ids, max_new_tokens) for t in r.tokens])
        add("plain", len(plain), s)
        source = LocalDraftSource(drafter, tenant=workload, session_id=f"{workload}-{i}")
        fresh_prefill(engine.backend)
        results, s = _timed(lambda: list(engine.generate(ids, max_new_tokens, drafter=source)))
        drafted = [t for r in results for t in r.tokens]
        add("draft", len(drafted), s)
        steps += len(results)
        same &= drafted == plain
        if drafted != plain:
            divergence = first_divergence(engine.backend, ids, plain, drafted)
            margins += [divergence.margin] if divergence is not None else []
        if lookups:
            add("hf", *_len_s(llama_lookup(lookups[0], ids, max_new_tokens)))
            add("lookup", *_len_s(llama_lookup(lookups[1], ids, max_new_tokens)))
        elif hf:
            add("hf", *_len_s(hf_generate(loaded, ids, max_new_tokens)))
            add("lookup", *_len_s(hf_generate(loaded, ids, max_new_tokens, prompt_lookup_num_tokens=10)))
    rate = {k: (n / s if s else 0.0) for k, (n, s) in totals.items()}
    return WorkloadSpeed(workload, len(prompts), totals["draft"][0], steps, rate["plain"], rate["draft"],
                         rate["hf"], rate["lookup"], same, tuple(margins), engine.backend.kind)


def _len_s(result: tuple) -> tuple[int, float]:  # (tokens, seconds, ...)
    return len(result[0]), result[1]


def table(rows: list[WorkloadSpeed], header: str) -> str:
    llama = bool(rows) and rows[0].backend == "llama.cpp"
    first, second = ("llama.cpp lookup 10 tok/s", "llama.cpp lookup 16 tok/s") if llama else \
        ("HF greedy tok/s", "HF prompt lookup tok/s")
    lines = [header, f"| workload | prompts | tokens | MAT | plain tok/s | {first} | specdraft tok/s | "
             f"speedup | {second} | lookup speedup | same output |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r.workload} | {r.prompts} | {r.new_tokens} | {r.mat:.2f} | {r.plain_tok_s:.1f} | "
                     f"{r.hf_tok_s:.1f} | {r.draft_tok_s:.1f} | {r.speedup(r.draft_tok_s):.2f}x | "
                     f"{r.lookup_tok_s:.1f} | {r.speedup(r.lookup_tok_s):.2f}x | {_same(r)} |")
    return "\n".join(lines)


def _same(r: WorkloadSpeed) -> str:
    """'yes', or how many prompts differ with the plain run's logit margins where they part."""
    if r.same_output:
        return "yes"
    margins = ", ".join(f"{m:.2f}" for m in r.margins)
    return f"NO: {len(r.margins)}/{r.prompts} differ (top-2 logit margins {margins})"


def write_json(rows: list[WorkloadSpeed], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([asdict(r) | {"mat": r.mat} for r in rows], indent=2) + "\n")


def write_chart(rows: list[WorkloadSpeed], path: str) -> None:
    """Grouped bars: tokens/s by workload for plain, the two anchors and specdraft (MAT annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    llama = bool(rows) and rows[0].backend == "llama.cpp"
    series = [("plain", "plain_tok_s"), ("llama.cpp lookup 10" if llama else "HF greedy", "hf_tok_s"),
              ("llama.cpp lookup 16" if llama else "HF prompt lookup", "lookup_tok_s"), ("specdraft", "draft_tok_s")]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 4.2))
    width = 0.8 / len(series)
    for k, (label, attr) in enumerate(series):
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        bars = ax.bar(xs, [getattr(r, attr) for r in rows], width, label=label)
        if attr == "draft_tok_s":
            for bar, r in zip(bars, rows):
                ax.annotate(f"MAT {r.mat:.1f}", (bar.get_x() + width / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [r.workload for r in rows])
    ax.set(ylabel="tokens/s", title=f"Greedy generation, {rows[0].backend if rows else ''} backend")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    """The command: loads the model and the drafter once, then runs each workload (`--variants`,
    the default on CUDA, runs `specdraft.bench.generate_variants` instead: see `bench.cli`)."""
    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import DrafterConfig
    from retriever.store.datastore import open_datastore
    from specdraft.bench.replay import load_traces
    from verifier.api.server import load
    from verifier.api.settings import VerifierSettings
    from verifier.decoding.engine import Engine
    from verifier.decoding.model import resolve_gguf

    workloads = [w for w in args.workloads.split(",") if w]
    traces = load_traces(args.traces, workloads, args.limit)
    settings = VerifierSettings.from_env(model=args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                                         threads=args.threads, max_nodes=args.max_nodes)
    backend, load_s = _timed(lambda: load(settings))
    engine, cost_s = _timed(lambda: Engine(backend, max_nodes=args.max_nodes, cost_store=settings.cost_store()))
    loaded = getattr(backend, "loaded", backend)  # the HF model, for HF's own generate
    lookups = llama_lookups(resolve_gguf(settings.model_spec()), args.threads) \
        if backend.kind == "llama.cpp" and not args.no_hf else ()
    drafter = Drafter(DrafterConfig(), [open_datastore(p) for p in args.index])
    warm = prompt_ids(Prompt("warm-up", "warm-up", "def f(x):\n    return", False), loaded.tokenizer)
    for _ in engine.generate(warm, 4):  # first-call costs (allocations, lazy initialization)
        pass
    header = (f"End-to-end generation: model={args.model} backend={backend.kind} {backend.precision}, max_new_tokens="
              f"{args.max_new_tokens}, {args.limit} prompts per workload, indexes={args.index or 'none'} "
              f"(load {load_s:.1f} s, cost model {cost_s:.1f} s: {engine.cost_model.tokens} tokens -> "
              f"{[round(c / 1e6, 1) for c in engine.cost_model.cost_ns]} ms)")
    rows = []
    for workload, group in traces.items():
        rows.append(run_workload(engine, loaded, drafter, workload, prompts_of(group, args.tokenizer),
                                 args.max_new_tokens, not args.no_hf, lookups))
        print(f"  {workload}: done", flush=True)
    print(table(rows, header))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")
    if args.chart:
        write_chart(rows, args.chart)
        print(f"wrote {args.chart}")
    return 0
