"""`specdraft bench attach`: the HF transformers attachment against plain `model.generate`, as a
new user meets it (issue 14: the first call in a new process >= 2x plain, later calls >= 3x).

This process is the new one: it loads the model (`--model`, float32 on the CPU), reaches a
retriever (`--target`, or one started here on loopback with no datastore), and per copy task
("Repeat this code:" + the source of a standard-library function, `--functions`) times plain
greedy `generate` (after one untimed warm-up call in the process), then the calls 1..`--calls`
of a new `SpecdraftGenerate` with a tenant of its own: call 1 is the attachment's first (its
engine built, the cost curve read from the verifier's cost folder, or measured there if this
machine has none: said in the output), later calls also draft from the tenant's earlier outputs.
Speedup = plain seconds / call seconds, one run each, side by side. Prints a table
(`--json PATH`: also the result).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

FUNCTIONS = ("textwrap.dedent", "fnmatch.translate", "shlex.quote")


@dataclass(frozen=True)
class AttachCall:
    seconds: float
    new_tokens: int
    steps: int
    same_as_plain: bool


@dataclass(frozen=True)
class AttachTask:
    function: str
    prompt_tokens: int
    plain_s: float
    plain_tokens: int
    calls: tuple[AttachCall, ...]  # call 1 first

    def speedup(self, call: int) -> float:
        """Plain seconds over call `call`'s (0-based)."""
        return self.plain_s / self.calls[call].seconds if self.calls[call].seconds > 0 else 0.0


@dataclass(frozen=True)
class AttachResult:
    model: str
    max_new_tokens: int
    curve_on_disk: bool  # False: the first attachment call measured the cost curve
    tasks: tuple[AttachTask, ...]

    def table(self) -> str:
        calls = len(self.tasks[0].calls) if self.tasks else 0
        head = "| function | prompt | plain s | " + " | ".join(f"call {i + 1} s (x plain, steps)" for i in range(calls)) \
               + " | same output |"
        lines = [head, "|---" * (4 + calls) + "|"]
        for t in self.tasks:
            cells = " | ".join(f"{c.seconds:.2f} ({t.speedup(i):.2f}x, {c.steps})" for i, c in enumerate(t.calls))
            same = "yes" if all(c.same_as_plain for c in t.calls) else "NO"
            lines.append(f"| {t.function} | {t.prompt_tokens} | {t.plain_s:.2f} | {cells} | {same} |")
        curve = "read from disk" if self.curve_on_disk else "measured inside the first call (none on disk)"
        lines.append(f"model {self.model}, {self.max_new_tokens} new tokens, greedy; cost curve {curve}")
        return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="HF folder, cached HF id, .gguf file or smollm2 (default)")
    p.add_argument("--max-new-tokens", type=int, default=120, help="tokens per call (default %(default)s)")
    p.add_argument("--calls", type=int, default=2, help="attachment calls per task (default %(default)s)")
    p.add_argument("--functions", default=",".join(FUNCTIONS),
                   help="comma-separated module.function whose source each task repeats (default %(default)s)")
    p.add_argument("--target", help="host:port of a running retriever (default: start one here on loopback)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        sources = [(name, source_of(name)) for name in args.functions.split(",")]
        if args.max_new_tokens < 1 or args.calls < 1:
            raise ValueError(f"--max-new-tokens and --calls must be >= 1, got {args.max_new_tokens}, {args.calls}")
    except ValueError as e:
        print(f"specdraft bench attach: error: {e}", file=sys.stderr)
        return 2
    from specdraft.local import in_process_retriever

    if args.target:
        result = measure(args.model, sources, args.max_new_tokens, args.calls, args.target)
    else:
        with in_process_retriever([]) as target:
            result = measure(args.model, sources, args.max_new_tokens, args.calls, target)
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=1))
    return 0


def source_of(name: str) -> str:
    """The source of `module.function` ("textwrap.dedent"); raises ValueError when there is none."""
    module, _, attr = name.rpartition(".")
    try:
        return inspect.getsource(getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError, TypeError, OSError, ValueError) as e:
        raise ValueError(f"--functions must name module.function with Python source, got {name!r} ({e})") from None


def measure(model_name: str, sources: list[tuple[str, str]], max_new_tokens: int, calls: int,
            target: str) -> AttachResult:
    """Plain `generate` then `calls` attachment calls per (name, source), against the retriever at target."""
    import torch

    from specdraft.bench.generate import Prompt, prompt_ids
    from specdraft.integrations.hf import SpecdraftGenerate
    from verifier.decoding.model import ModelSpec, load_model

    loaded = load_model(ModelSpec(model_name))
    model, kw = loaded.model, dict(max_new_tokens=max_new_tokens, do_sample=False)
    probe = SpecdraftGenerate(target)
    curve_on_disk = probe.curve_kept(model)
    probe.close()
    tasks = []
    for name, source in sources:
        task = Prompt(name, "copy", f"Repeat this code:\n```python\n{source}```", chat=True)
        ids = torch.tensor([prompt_ids(task, loaded.tokenizer)], dtype=torch.int64)  # [1, p]
        model.generate(ids, max_new_tokens=2, do_sample=False)  # the process's first-call costs: not timed
        plain_s, plain = _timed(lambda: model.generate(ids, **kw))
        attach = SpecdraftGenerate(target, tenant=f"bench-attach-{uuid.uuid4().hex[:8]}")
        try:
            runs = []
            for _ in range(calls):
                seconds, out = _timed(lambda: model.generate(ids, custom_generate=attach, **kw))
                runs.append(AttachCall(seconds, attach.last_run.new_tokens, attach.last_run.steps,
                                       bool(torch.equal(out, plain))))
        finally:
            attach.close()
        tasks.append(AttachTask(name, ids.shape[1], plain_s, plain.shape[1] - ids.shape[1], tuple(runs)))
    return AttachResult(model_name, max_new_tokens, curve_on_disk, tuple(tasks))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
