"""`specdraft bench generate --variants` (the default with `--device cuda`): five ways to decode the
same prompts greedily, by workload, in one process on one device.

- `hf-eager`: HF `generate`, dynamic cache, eager;
- `hf-static-compile`: HF `generate(cache_implementation="static")`, which transformers compiles
  on CUDA (`torch.compile`, CUDA graphs): the strongest plain HF baseline; on a CPU it runs the
  static cache uncompiled (noted);
- `hf-lookup`: HF `generate(prompt_lookup_num_tokens=10)`;
- `specdraft-eager`: the engine over the eager dynamic-cache HF backend, drafting in process;
- `specdraft-graphs`: the engine over the static-cache backend with captured CUDA graphs
  (`verifier.decoding.hf_static`); on a CPU there are no graphs: the row runs the static cache
  eagerly and says so (never a faked graph figure).

Per row: tokens/s, MAT and draft ms per step with its share of the step (engine rows), whether
the output equals `hf-eager`'s, and speedups over `hf-static-compile` and `hf-eager`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from specdraft.bench.generate import Prompt, prompt_ids, prompts_of

VARIANTS = ("hf-eager", "hf-static-compile", "hf-lookup", "specdraft-eager", "specdraft-graphs")


@dataclass(frozen=True)
class VariantSpeed:
    workload: str
    variant: str  # one of VARIANTS
    prompts: int
    new_tokens: int
    seconds: float
    steps: int  # engine rows: forward passes after the prefill; HF rows: 0
    draft_ns: int  # engine rows: time in the drafter, all steps
    verify_ns: int  # engine rows: time in verify + accept + commit, all steps
    same_output: bool  # the output equals hf-eager's on every prompt
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def mat(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def draft_ms_per_step(self) -> float:
        return self.draft_ns / self.steps / 1e6 if self.steps else 0.0

    @property
    def draft_share(self) -> float:
        total = self.draft_ns + self.verify_ns
        return self.draft_ns / total if total else 0.0


def wants_variants(args) -> bool:
    """--variants, or no flag and a CUDA device."""
    return bool(args.variants) or (args.variants is None and args.device.startswith("cuda"))


def _hf_generate(loaded, ids: list[int], new: int, **kwargs) -> tuple[list[int], float]:
    import torch

    x = torch.tensor([ids], device=loaded.device)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = loaded.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                                    pad_token_id=loaded.eos_token_ids[0] if loaded.eos_token_ids else None, **kwargs)
        sync()
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def _engine_generate(engine, ids: list[int], new: int, drafter) -> tuple[list[int], float, list]:
    t0 = time.perf_counter()
    steps = list(engine.generate(ids, new, drafter=drafter))
    return [t for s in steps for t in s.tokens], time.perf_counter() - t0, steps


class Variants:
    """The decoders of one run over one loaded model (engines measure their cost models once)."""

    def __init__(self, loaded, max_nodes: int, static_positions: int, warm_tokens: int, warm_new: int,
                 cost_model=None) -> None:
        """warm_tokens + warm_new: the longest prompt + max new tokens (HF's static cache is sized,
        and compiled, once for them). cost_model None: each engine measures its own (tests pass a flat one)."""
        from verifier.decoding.engine import Engine
        from verifier.decoding.hf import HFBackend
        from verifier.decoding.hf_static import HFStaticBackend

        self.loaded, self.cuda = loaded, loaded.device.type == "cuda"
        self.eager = Engine(HFBackend(loaded), cost_model, max_nodes=max_nodes)
        static = HFStaticBackend(loaded, max_positions=static_positions, graphs=True)
        self.graphs = Engine(static, cost_model, max_nodes=max_nodes)
        self.notes = {"hf-static-compile": "" if self.cuda else "cpu: static cache, not compiled",
                      "specdraft-graphs": "" if static.graphs else "cpu: no CUDA graphs; the static cache eagerly"}
        if self.cuda and not all(step.graph is not None for step in static._steps.values()):
            self.notes["specdraft-graphs"] = "some sizes failed to capture and ran eagerly (see the log)"
        warm = list(range(100, 100 + warm_tokens))  # compiles HF's static forward at the longest cache once
        _hf_generate(loaded, warm, warm_new, cache_implementation="static")
        for engine in (self.eager, self.graphs):
            for _ in engine.generate(warm[:8], 4):
                pass

    def run(self, variant: str, ids: list[int], new: int, drafter) -> tuple[list[int], float, list]:
        if variant == "hf-eager":
            return (*_hf_generate(self.loaded, ids, new), [])
        if variant == "hf-static-compile":
            return (*_hf_generate(self.loaded, ids, new, cache_implementation="static"), [])
        if variant == "hf-lookup":
            return (*_hf_generate(self.loaded, ids, new, prompt_lookup_num_tokens=10), [])
        engine = self.eager if variant == "specdraft-eager" else self.graphs
        return _engine_generate(engine, ids, new, drafter)


def run_workload(variants: Variants, drafters: dict, workload: str, prompts: list[Prompt],
                 max_new_tokens: int) -> list[VariantSpeed]:
    """Every variant over every prompt of one workload; drafters: one per engine variant (own history)."""
    from verifier.drafting import LocalDraftSource

    rows = []
    reference: list[list[int]] = []
    for variant in VARIANTS:
        tokens = seconds = steps = draft_ns = verify_ns = 0
        same = True
        for i, p in enumerate(prompts):
            ids = prompt_ids(p, variants.loaded.tokenizer)
            source = LocalDraftSource(drafters[variant], tenant=workload, session_id=f"{workload}-{i}") \
                if variant in drafters else None
            out, s, results = variants.run(variant, ids, max_new_tokens, source)
            if variant == "hf-eager":
                reference.append(out)
            same &= out == reference[i]
            tokens, seconds, steps = tokens + len(out), seconds + s, steps + len(results)
            draft_ns += sum(r.draft_ns for r in results)
            verify_ns += sum(r.verify_ns for r in results)
        rows.append(VariantSpeed(workload, variant, len(prompts), tokens, seconds, steps, draft_ns, verify_ns, same,
                                 variants.notes.get(variant, "")))
    return rows


def table(rows: list[VariantSpeed], header: str) -> str:
    lines = [header, "| workload | variant | tokens | tok/s | MAT | draft ms/step | draft share | vs static+compile "
             "| vs eager | same output | note |", "|---" * 11 + "|"]
    base = {(r.workload, r.variant): r.tok_s for r in rows}
    for r in rows:
        compiled, eager = base.get((r.workload, "hf-static-compile"), 0.0), base.get((r.workload, "hf-eager"), 0.0)
        mat = f"{r.mat:.2f}" if r.steps else "-"
        draft = f"{r.draft_ms_per_step:.2f} | {100 * r.draft_share:.1f}%" if r.steps else "- | -"
        lines.append(f"| {r.workload} | {r.variant} | {r.new_tokens} | {r.tok_s:.1f} | {mat} | {draft} | "
                     f"{r.tok_s / compiled if compiled else 0:.2f}x | {r.tok_s / eager if eager else 0:.2f}x | "
                     f"{'yes' if r.same_output else 'NO'} | {r.note} |")
    return "\n".join(lines)


def run(args) -> int:
    """The command: one model, five decoders, each workload's prompts through each."""
    import torch

    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import DrafterConfig
    from retriever.store.datastore import open_datastore
    from specdraft.bench.replay import load_traces
    from verifier.decoding.model import ModelSpec, load_model

    workloads = [w for w in args.workloads.split(",") if w]
    traces = load_traces(args.traces, workloads, args.limit)
    t0 = time.perf_counter()
    loaded = load_model(ModelSpec(args.model, dtype=args.dtype, device=args.device))
    groups = {w: prompts_of(g, args.tokenizer) for w, g in traces.items()}
    longest = max((len(prompt_ids(p, loaded.tokenizer)) for g in groups.values() for p in g), default=16)
    if longest + args.max_new_tokens > args.static_positions:
        raise ValueError(f"--static-positions must hold the longest prompt + --max-new-tokens, got "
                         f"{args.static_positions} < {longest} + {args.max_new_tokens}")
    variants = Variants(loaded, args.max_nodes, args.static_positions, longest, args.max_new_tokens)
    setup_s = time.perf_counter() - t0
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu"
    header = (f"Decoders compared: model={args.model} {args.dtype} on {device}, max_new_tokens={args.max_new_tokens}, "
              f"{args.limit} prompts per workload, indexes={args.index or 'none'} (set-up {setup_s:.1f} s; cost "
              f"models: eager {_costs(variants.eager)}, static {_costs(variants.graphs)})")
    rows = []
    for workload, prompts in groups.items():
        drafters = {v: Drafter(DrafterConfig(), [open_datastore(p) for p in args.index])
                    for v in ("specdraft-eager", "specdraft-graphs")}
        rows += run_workload(variants, drafters, workload, prompts, args.max_new_tokens)
        print(f"  {workload}: done", flush=True)
    print(table(rows, header))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "rows": [
            asdict(r) | {"tok_s": r.tok_s, "mat": r.mat, "draft_ms_per_step": r.draft_ms_per_step,
                         "draft_share": r.draft_share} for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _costs(engine) -> str:
    cm = engine.cost_model
    return ", ".join(f"{t}: {c / 1e6:.2f} ms" for t, c in zip(cm.tokens, cm.cost_ns))
