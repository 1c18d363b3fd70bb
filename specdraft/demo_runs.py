"""The demo's runs of one prompt: plain decoding and specdraft through the in-process verifier (gRPC),
and the anchors on the same model: llama.cpp's own prompt lookup decoding (`Anchors`: 16 predicted
tokens by default, the setting that is faster on code edits; `--lookup 10,16` runs both), or HF
transformers' prompt lookup for the HF backend.

Every run is timed the same way from the caller's side: `first_s` (the prompt's prefill and the
first step), `total_s`; its decode rate counts the tokens after the first step over the time after
it, so prefill (the same work for every method) does not blur the speedup; the end-to-end rate
counts everything.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from specdraft.demo_workloads import DemoPrompt
from specdraft.local import Generation, generate
from verifier.api.settings import VerifierSettings

PLAIN, SPECDRAFT = "plain", "specdraft"
_LOOKUP_CTX = 2048  # the demo's prompts and answers fit; logits_all keeps n_ctx x vocab float32 per anchor


@dataclass(frozen=True)
class Run:
    method: str  # plain | specdraft | llama.cpp lookup 10 | llama.cpp lookup 16 | HF lookup 10
    token_ids: tuple[int, ...]
    first_s: float  # seconds to the first step's tokens (prefill included)
    total_s: float
    first_tokens: int  # tokens of the first step
    steps: int  # model steps (0: not reported by the method)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first step per second after it."""
        rest = self.total_s - self.first_s
        return (len(self.token_ids) - self.first_tokens) / rest if rest > 0 else 0.0

    @property
    def e2e_tok_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0

    @property
    def mat(self) -> float | None:
        """Mean tokens per model step (None: steps not known)."""
        return len(self.token_ids) / self.steps if self.steps else None


def from_generation(method: str, g: Generation) -> Run:
    return Run(method, g.token_ids, g.first_s, g.total_s, g.step_tokens[0] if g.step_tokens else 0,
               len(g.step_tokens))


def grpc_request(p: DemoPrompt, max_new_tokens: int, no_draft: bool, tenant: str):
    from protos.specdraft.v1 import verifier_pb2 as pb

    req = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=max_new_tokens), tenant=tenant,
                             no_draft=no_draft)
    if p.kind == "chat":
        req.chat.messages.add(role="user", content=p.prompt)
    else:
        req.text = p.prompt
    return req


def grpc_run(stub, p: DemoPrompt, max_new_tokens: int, drafted: bool, tenant: str) -> Run:
    """One generation through the verifier: plain (no_draft) or drafting from the retriever."""
    g = generate(stub, grpc_request(p, max_new_tokens, not drafted, tenant))
    return from_generation(SPECDRAFT if drafted else PLAIN, g)


def prompt_ids(p: DemoPrompt, tokenizer) -> list[int]:
    """The token ids the verifier makes of the prompt (the chat template for chat prompts)."""
    from specdraft.bench.generate import Prompt
    from specdraft.bench.generate import prompt_ids as ids_of

    return ids_of(Prompt(p.name, p.workload, p.prompt, p.kind == "chat"), tokenizer)


class Anchors:
    """The baselines of one backend on the model file: llama.cpp prompt lookup at each of
    `lookup_tokens` predicted tokens (one `Llama` object: a later setting swaps the draft model in
    and reuses the first run's prefill of the same prompt, so its end-to-end time is not comparable;
    its decode rate is), or HF's prompt lookup at 10 (`lookup_tokens` unused).

    The lookup prefills each prompt in its own context: `Llama` runs without flash attention (its
    default), whose V cache layout cannot load the verifier backend's (`llama_state_seq_set_data`:
    "incompatible V transposition"), and with it on the anchor decoded ~6% slower here."""

    def __init__(self, backend, settings: VerifierSettings, lookup_tokens: tuple[int, ...]) -> None:
        from specdraft.bench.generate import llama_lookup_model

        self._backend, self._llm, self._lookup_tokens = backend, None, lookup_tokens
        if backend.kind == "llama.cpp":
            self._llm = llama_lookup_model(backend.path, settings.threads, n_ctx=_LOOKUP_CTX)
            self.methods: tuple[str, ...] = tuple(f"llama.cpp lookup {n}" for n in lookup_tokens)
        else:
            self.methods = ("HF lookup 10",)

    def runs(self, ids: list[int], max_new_tokens: int) -> list[Run]:
        if self._llm is None:
            return [self._hf(ids, max_new_tokens)]
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        from specdraft.bench.generate import llama_lookup

        self._llm.reset()  # no KV prefix kept from the previous prompt: the first run prefills the whole prompt
        out = []
        for method, n in zip(self.methods, self._lookup_tokens):
            self._llm.draft_model = LlamaPromptLookupDecoding(num_pred_tokens=n)
            tokens, seconds, first_s = llama_lookup(self._llm, ids, max_new_tokens)
            out.append(Run(method, tuple(tokens), first_s, seconds, 1, 0))
        return out

    def _hf(self, ids: list[int], max_new_tokens: int) -> Run:
        from specdraft.bench.generate import hf_generate

        timer = _FirstToken()
        tokens, seconds = hf_generate(self._backend.loaded, ids, max_new_tokens, prompt_lookup_num_tokens=10,
                                      streamer=timer)
        eos = set(self._backend.eos_token_ids)
        cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))  # HF pads after EOS
        return Run(self.methods[0], tuple(tokens[:cut]), timer.first_s or seconds, seconds, 1, 0)

    def warm_up(self, ids: list[int]) -> None:
        self.runs(ids, 4)


class _FirstToken:
    """A transformers streamer that notes when the first new token comes (the first put is the prompt)."""

    def __init__(self) -> None:
        self._t0, self._puts, self.first_s = time.perf_counter(), 0, 0.0

    def put(self, value) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_s = time.perf_counter() - self._t0

    def end(self) -> None:
        pass


def load_backend(settings: VerifierSettings, cache_dir: Path):
    """`verifier.api.server.load`, except that a llama.cpp backend gets the GGUF's tokenizer from a
    cache (converting it from the GGUF takes ~25 s for Qwen2.5-Coder; a saved copy loads in ~1.5 s)."""
    from verifier.api.server import load

    if settings.backend_kind() != "llama.cpp":
        return load(settings)
    from verifier.decoding.llama_cpp import LlamaCppBackend
    from verifier.decoding.model import resolve_gguf

    gguf = Path(resolve_gguf(settings.model_spec()))
    return LlamaCppBackend(str(gguf), max_nodes=settings.max_nodes, n_threads=settings.threads,
                           tokenizer=cached_tokenizer(gguf, cache_dir))


def cached_tokenizer(gguf: Path, cache_dir: Path):
    """The GGUF's HF tokenizer, converted once and saved under cache_dir/tokenizers/ (keyed by the
    file's name and size)."""
    from transformers import AutoTokenizer

    saved = cache_dir / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tmp = saved.with_name(saved.name + ".tmp")
    tokenizer.save_pretrained(str(tmp))
    if not saved.exists():  # a concurrent demo may have saved it first
        tmp.replace(saved)
    shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
