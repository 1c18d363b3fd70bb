"""`specdraft bench predicted`: OpenAI Predicted Outputs and FIM completions, end to end (either backend).

Edits: the first `--limit` refactor prompts of the dev traces, shaped as edit clients send them:
the user message holds the instruction and the file (the function's code block), under the
model's chat template, and the prediction is the file. Each request runs greedily three times,
interleaved (none / right / wrong: the next request's function), on one `Engine` drafting from an
in-process `Drafter` (tenant = the variant, so each variant sees its own earlier outputs alike).
The comparison is fair: the engine is untimed (`Engine(timed=False)`: its step policy prices each
step by the cost curve's prediction, so how much of a tree it verifies and when it backs off do not
follow the machine's clock; tokens/s is still measured by the clock), and each request's three
variants start from the same policy state (`StepPolicy.snapshot` before the first, `restore`
before each), so no variant inherits what an earlier variant taught the calibration.
Each output is also replayed through a second drafter (same tenants, sessions and predictions) with
whole trees verified, as `specdraft bench replay` does for the traces: the drafts' MAT, which a step
policy's choices do not move (under the cost-aware policy a request of 128 tokens takes 4-20 steps,
so one step more or less moves its MAT by 5-25%).
Printed: MAT (step policy and drafts') and tokens/s per variant, the worst per-request drafts' MAT
ratio right/none (target >= 0.98), the ratio of the mean drafts' MATs (target > 1), the tokens/s
ratio wrong/none (target >= 0.95), the same MAT ratios under the step policy, and whether the three
outputs agree (they must: greedy). FIM: `--fim` completions cut from stdlib files (prefix of
up to 40 lines, middle of 1-5 lines, suffix of up to 20 lines; files and cuts drawn with a fixed
seed), run greedily on the model's FIM prompt (`verifier.api.fim`) up to `--fim-max-new-tokens`:
MAT, tokens/s (and apart: the first steps, which hold the prompt's forward, and the tokens/s
after them), how many the model ended (a FIM end token) rather than the limit, and the match
measures of `FimScore` (exact; exact with trailing whitespace trimmed; the middle's lines, then
maybe more; the first line); a model without FIM tokens skips them (SmolLM2, the default, has none).
"""

from __future__ import annotations

import random
import re
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
VARIANTS = ("none", "right", "wrong")


@dataclass
class Tally:
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    first_s: float = 0.0  # of `seconds`: until each request's first step ended (its prompt's forward + one step)
    mats: list[float] = field(default_factory=list)  # per request

    @property
    def mat(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens/s after each request's first step (the prompt's forward left out)."""
        rest = self.seconds - self.first_s
        return (self.tokens - len(self.mats)) / rest if rest > 0 else 0.0

    def add(self, tokens: int, steps: int, seconds: float, first_s: float) -> None:
        self.tokens, self.steps, self.seconds = self.tokens + tokens, self.steps + steps, self.seconds + seconds
        self.first_s += first_s
        self.mats.append(tokens / max(steps, 1))


def edit_requests(traces, tokenizer_path: str) -> list[tuple[str, str]]:
    """(user message, file) of each refactor trace whose message holds one python code block."""
    from specdraft.bench.generate import prompts_of

    out = []
    for p in prompts_of(traces, tokenizer_path):
        blocks = _BLOCK.findall(p.text)
        if p.chat and blocks:
            out.append((p.text, blocks[0]))
    return out


def _generate(engine, ids: list[int], max_new: int, source, stop_ids: list[int] | None = None) -> tuple:
    """(tokens, steps, seconds, seconds to the first step's end) of one greedy generation, its prefill
    included (never one kept from the variant before)."""
    from specdraft.bench.generate import fresh_prefill

    fresh_prefill(engine.backend)
    t0 = time.perf_counter()
    tokens, steps, first = [], 0, 0.0
    for r in engine.generate(ids, max_new, drafter=source, stop_token_ids=stop_ids):
        tokens += r.tokens
        steps += 1
        first = first or time.perf_counter() - t0
    return tokens, steps, time.perf_counter() - t0, first


def replay_drafts(source, prompt_ids: list[int], output: list[int], max_nodes: int) -> tuple[int, int]:
    """(tokens, steps) of `output` replayed through a draft source with whole trees verified (the
    drafts' MAT, whatever a step policy would verify): each step accepts the tree's longest root path
    equal to the output's next tokens, plus the next token (the bonus), and reports them as the
    engine does (verified_nodes: the whole tree)."""
    from specdraft.bench.replay import accepted_length

    source.start(prompt_ids)
    pos = steps = verified = 0
    new: list[int] = []
    while pos < len(output):
        tree = source.draft(new, max_nodes, verified)
        verified = len(tree) if tree is not None else 0
        accepted = accepted_length(tree.token_ids, tree.parents, output[pos:]) if verified else 0
        new = output[pos:pos + accepted + 1]
        pos, steps = pos + len(new), steps + 1
    source.end(verified)
    return pos, steps


@dataclass
class EditResults:
    """Per variant: the engine's generations (`engine`: its step policy's MAT, tokens/s) and the same
    outputs replayed with whole trees verified (`drafts`: the drafts' MAT); whether every request's
    three outputs agree."""

    engine: dict[str, Tally]
    drafts: dict[str, Tally]
    same: bool


def run_edits(engine, loaded, drafter, requests: list[tuple[str, str]], max_new: int,
              replay_drafter) -> EditResults:
    """Each request's three variants on the engine (from one policy state), each output then replayed
    through `replay_drafter` (another drafter, so the engine's sees only its own sessions) with the same
    tenant, session and prediction (`replay_drafts`)."""
    from verifier.drafting import LocalDraftSource

    tok = loaded.tokenizer
    out = EditResults({v: Tally() for v in VARIANTS}, {v: Tally() for v in VARIANTS}, True)
    for i, (message, file) in enumerate(requests):
        text = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                       tokenize=False)
        ids = list(tok.encode(text, add_special_tokens=False))
        wrong = requests[(i + 1) % len(requests)][1]
        outputs, before = [], engine.policy.snapshot()
        for variant, prediction in zip(VARIANTS, ("", file, wrong)):
            engine.policy.restore(before)  # each variant starts from the same policy state
            pred_ids = tok.encode(prediction, add_special_tokens=False) if prediction else []
            source = LocalDraftSource(drafter, tenant=variant, session_id=f"{variant}-{i}", prediction_ids=pred_ids)
            tokens, steps, s, first = _generate(engine, ids, max_new, source)
            out.engine[variant].add(len(tokens), steps, s, first)
            outputs.append(tokens)
            replay = LocalDraftSource(replay_drafter, tenant=variant, session_id=f"{variant}-{i}",
                                      prediction_ids=pred_ids)
            out.drafts[variant].add(*replay_drafts(replay, ids, tokens, engine.max_nodes), 0.0, 0.0)
        out.same &= outputs[0] == outputs[1] == outputs[2]
        mats = " ".join(f"{v} {out.engine[v].mats[-1]:.2f}" for v in VARIANTS)
        drafts = " ".join(f"{v} {out.drafts[v].mats[-1]:.2f}" for v in VARIANTS)
        print(f"  edit {i}: MAT {mats}; drafts' MAT (whole trees) {drafts}; output right "
              f"{'=' if outputs[1] == outputs[0] else '!='} none, wrong {'=' if outputs[2] == outputs[0] else '!='} "
              f"none", flush=True)
    return out


def fim_cuts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (prefix, middle, suffix) cut from stdlib .py files, one a file (middle: 1-5 whole lines, not
    blank); a file whose cut is blank is passed over for one drawn after the first n (fewer only when
    the stdlib has too few files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    rng = random.Random(seed)
    cuts = []
    for path in _drawn(rng, files, n):
        if len(cuts) == n:
            break
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        k = rng.randint(1, 5)
        start = rng.randrange(10, max(11, len(lines) - k - 10))
        middle = "".join(lines[start:start + k])
        if middle.strip():
            cuts.append(("".join(lines[max(0, start - 40):start]), middle, "".join(lines[start + k:start + k + 20])))
    return cuts


def _drawn(rng: random.Random, files: list[Path], n: int):
    """n files drawn, then (lazily: the first n cuts do not depend on it) the others in a drawn order."""
    first = rng.sample(files, min(n, len(files)))
    yield from first
    rest = sorted(set(files) - set(first))
    yield from rng.sample(rest, len(rest))


@dataclass(frozen=True)
class FimScore:
    """One completion against the middle cut out, as code-completion evaluations compare them; "trimmed"
    lines: trailing whitespace stripped from each line, trailing blank lines dropped."""

    exact: bool  # the completion is the middle, character for character
    exact_trimmed: bool  # its trimmed lines are the middle's
    lines: bool  # its first k trimmed lines are the middle's k (the middle, then maybe more)
    first_line: bool  # its first trimmed line is the middle's first
    ended: bool  # the model ended it (a FIM end token or EOS), not the token limit


def _trimmed(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def score_fim(completion: str, middle: str, ended: bool) -> FimScore:
    """Example: middle "a = 1\\nb = 2\\n", completion "a = 1  \\nb = 2\\nc = 3" -> not exact, not
    exact_trimmed, lines and first_line."""
    got, want = _trimmed(completion), _trimmed(middle)
    return FimScore(completion == middle, got == want, bool(want) and got[:len(want)] == want,
                    bool(want) and got[:1] == want[:1], ended)


def run_fim(engine, loaded, drafter, cuts, max_new: int) -> tuple[Tally, list[FimScore]] | None:
    """Tally and scores of the FIM completions; None when the model has no FIM tokens."""
    from verifier.api.fim import fim_prompt, fim_tokens
    from verifier.drafting import LocalDraftSource

    tokens = fim_tokens(loaded.tokenizer)
    if tokens is None:
        return None
    ends = {*loaded.eos_token_ids, *tokens.end_ids}
    tally, scores = Tally(), []
    for i, (prefix, middle, suffix) in enumerate(cuts):
        ids = fim_prompt(tokens, loaded.tokenizer, prefix, suffix)
        source = LocalDraftSource(drafter, tenant="fim", session_id=f"fim-{i}")
        out, steps, s, first = _generate(engine, ids, max_new, source, sorted(ends))
        ended = bool(out) and out[-1] in ends
        out = [t for t in out if t not in ends]
        tally.add(len(out), steps, s, first)
        text = loaded.tokenizer.decode(out, skip_special_tokens=True)
        scores.append(score_fim(text, middle, ended))
    return tally, scores


def fim_line(t: Tally, scores: list[FimScore], n_asked: int, max_new: int) -> str:
    """The FIM report: speed (prompt forward apart) and the match measures, each out of the completions."""
    n = len(scores)

    def count(what: str) -> str:
        return f"{sum(getattr(x, what) for x in scores)}/{n}"

    return (f"FIM: {n} completions (of {n_asked} asked), at most {max_new} new tokens: MAT {t.mat:.2f}, "
            f"{t.tok_s:.1f} tokens/s overall; first steps (the prompt's forward + one step) {t.first_s:.1f} s of "
            f"{t.seconds:.1f} s, {t.decode_tok_s:.1f} tokens/s after them; ended by the model {count('ended')} "
            f"(the rest hit the limit); exact match {count('exact')}, exact with trailing whitespace trimmed "
            f"{count('exact_trimmed')}, the middle's lines then more {count('lines')}, first line "
            f"{count('first_line')}")


def ratios(right: Tally, none: Tally) -> tuple[float, float]:
    """(worst per-request MAT ratio right / none, ratio of the mean per-request MATs)."""
    worst = min((r / n for r, n in zip(right.mats, none.mats) if n), default=0.0)
    mean = (sum(right.mats) / len(right.mats)) / (sum(none.mats) / len(none.mats)) if none.mats else 0.0
    return worst, mean


def table(results: EditResults, fim, model: str, n_fim: int, fim_max_new: int) -> str:
    """The edits' table, the targets (MAT: the drafts'; tokens/s: the engine's) and the FIM line."""
    tallies, drafts = results.engine, results.drafts
    lines = ["| variant | requests | tokens | MAT (step policy) | drafts' MAT (whole trees) | tokens/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {v} | {len(t.mats)} | {t.tokens} | {t.mat:.2f} | {drafts[v].mat:.2f} | {t.tok_s:.1f} |"
              for v, t in tallies.items()]
    none, wrong = tallies["none"], tallies["wrong"]
    (worst, mean), (p_worst, p_mean) = ratios(drafts["right"], drafts["none"]), ratios(tallies["right"], none)
    lines += ["", f"right/none drafts' MAT: worst request {worst:.3f} (target >= 0.98), mean {mean:.3f} (target > 1); "
              f"wrong/none tokens/s {wrong.tok_s / none.tok_s if none.tok_s else 0:.3f} (target >= 0.95); "
              f"same output in all three: {'yes' if results.same else 'NO'}",
              f"right/none MAT under the step policy (steps of one request: a step moves it by 1/steps): worst "
              f"request {p_worst:.3f}, mean {p_mean:.3f}"]
    if n_fim == 0:
        lines.append("FIM: none asked (--fim 0)")
    elif fim is None:
        lines.append(f"FIM: skipped, model {model} has no fill-in-the-middle tokens")
    else:
        lines.append(fim_line(*fim, n_fim, fim_max_new))
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2", help="HF folder, cached HF id, .gguf file or smollm2 (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-nodes", type=int, default=64, help="draft budget per step (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "llama.cpp"),
                   help="the engine: auto (default: llama.cpp for a .gguf file on the CPU), hf, llama.cpp")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default 0: every core)")
    p.add_argument("--limit", type=int, default=20, help="edit requests (refactor traces, default %(default)s)")
    p.add_argument("--fim", type=int, default=20, help="FIM completions from stdlib files (default %(default)s)")
    p.add_argument("--fim-max-new-tokens", type=int, default=96,
                   help="FIM token limit (default %(default)s: the 20 default middles hold at most 60 tokens)")
    p.add_argument("--traces", default=None, help="JSONL traces (default: the dev traces)")
    p.add_argument("--tokenizer", default="../shared/models/qwen2.5-coder-1.5b",
                   help="the traces' tokenizer (to decode their prompts)")


def run(args) -> int:
    """The command: one model, one engine, one drafter; edits then FIM."""
    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import DrafterConfig
    from specdraft.bench.replay import DEFAULT_TRACES, load_traces
    from verifier.api.server import load
    from verifier.api.settings import VerifierSettings
    from verifier.decoding.engine import Engine

    traces = load_traces(args.traces or DEFAULT_TRACES, ["refactor"], None)["refactor"]
    requests = edit_requests(traces, args.tokenizer)[:args.limit]
    if len(requests) < 2:
        raise SystemExit(f"error: the traces must hold at least 2 refactor prompts with a code block, "
                         f"got {len(requests)}")
    settings = VerifierSettings.from_env(model=args.model, dtype=args.dtype, device=args.device,
                                         backend=args.backend, threads=args.threads, max_nodes=args.max_nodes)
    loaded = load(settings)
    engine = Engine(loaded, max_nodes=args.max_nodes, cost_store=settings.cost_store(), timed=False)
    for _ in engine.generate(list(loaded.tokenizer.encode("def f(x):\n    return")), 4):  # first-call costs
        pass
    edits = run_edits(engine, loaded, Drafter(DrafterConfig()), requests, args.max_new_tokens,
                      replay_drafter=Drafter(DrafterConfig()))
    fim = run_fim(engine, loaded, Drafter(DrafterConfig()), fim_cuts(args.fim), args.fim_max_new_tokens)
    print(f"Predicted outputs: model={args.model} backend={loaded.kind} {loaded.precision}, "
          f"max_new_tokens={args.max_new_tokens}, "
          f"max_nodes={args.max_nodes}, {len(requests)} edit requests; step policy untimed (steps priced by the "
          f"cost curve, not the clock; tokens/s measured), each request's variants from the same policy state")
    print(table(edits, fim, args.model, args.fim, args.fim_max_new_tokens))
    return 0
