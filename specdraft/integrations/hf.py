"""Drafting through a specdraft retriever inside a stock `transformers` `model.generate(...)`.

The attachment uses transformers' supported extension point for decoding loops,
`generate(custom_generate=callable)`: transformers prepares the inputs and the generation
config, then hands the loop to `SpecdraftGenerate`, which runs the verifier's `Engine` (tree
drafts from the retriever, one forward pass per draft tree, greedy or lossless sampling, KV
cache kept to the accepted path) and returns the usual `[batch, prompt + new]` token ids.

Example:
    >>> attach = SpecdraftGenerate("127.0.0.1:50051", tenant="team-a")
    >>> out = model.generate(input_ids, max_new_tokens=64, do_sample=False, custom_generate=attach)

Limits (ValueError when asked for): batch size 1, no padding in the attention mask, no beam
search, and only the logits processors that `SamplingParams` expresses (temperature, top-k,
top-p). The retriever being down or slow costs speed only (plain decoding for that step).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from verifier.decoding.accept import SamplingParams
from verifier.decoding.cost_store import CostStore
from verifier.decoding.engine import Engine  # at import, not in the first generate call (~0.1 s on 2 cores)
from verifier.decoding.model import LoadedModel, ModelSpec, cache_root

if TYPE_CHECKING:
    from verifier.decoding.cost import CostModel

_EXPRESSIBLE = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"}


@dataclass(frozen=True)
class RunStats:
    """The last call's figures: new tokens, model steps, accepted draft tokens."""

    new_tokens: int
    steps: int
    accepted_draft_tokens: int


class SpecdraftGenerate:
    """A `custom_generate` callable drafting from the retriever at `target` (host:port).

    One `Engine` per model: its step cost is `cost_model` if given, else the curve kept in
    `cost_dir` (default: the verifier's, `<repo>/.cache/models/costs`), measured on first use of a
    model on this machine and kept there, so later processes start at full speed. One retriever
    session per call, whose output becomes a prior output of `tenant`. `close()` closes the
    retriever channel.
    """

    def __init__(self, target: str, tenant: str = "default", max_nodes: int = 64, deadline_s: float = 0.05,
                 cost_model: "CostModel | None" = None, cost_dir: str | None = None) -> None:
        from retriever.client import RetrieverClient

        self.client = RetrieverClient(target, deadline_s)
        self.tenant, self.max_nodes, self.cost_model = tenant, max_nodes, cost_model
        self.cost_store = CostStore(cost_dir or cache_root(ModelSpec()) / "costs")
        self._engines: dict[int, Engine] = {}
        self.last_run: RunStats | None = None

    def __call__(self, model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
                 generation_config=None, **model_kwargs) -> torch.LongTensor:
        """[1, p] int64 prompt -> [1, p + n] int64; n <= max_length - p, ending at an EOS token if one comes."""
        _check_inputs(input_ids, model_kwargs.get("attention_mask"), generation_config, logits_processor)
        engine = self._engine(model)
        prompt = input_ids[0].tolist()
        eos = _eos_ids(generation_config)
        max_new = max(0, int(generation_config.max_length) - len(prompt))
        session = self.client.session(self.tenant, f"hf-{uuid.uuid4().hex}")
        steps = list(engine.generate(prompt, max_new, _sampling(generation_config), drafter=session,
                                     stop_token_ids=eos))
        new = [t for step in steps for t in step.tokens]
        session.closed.wait(self.client.call_timeout_s)  # the output is the tenant's before generate returns
        self.last_run = RunStats(len(new), len(steps), sum(step.accepted_nodes for step in steps))
        tail = torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)  # [1, n]
        return torch.cat([input_ids, tail], dim=1)

    def _engine(self, model) -> Engine:
        key = id(model)
        if key not in self._engines:
            self._engines[key] = Engine(_loaded(model), cost_model=self.cost_model, max_nodes=self.max_nodes,
                                        cost_store=self.cost_store)
        return self._engines[key]

    def curve_kept(self, model) -> bool:
        """Whether the cost curve of `model` was given (`cost_model`) or is kept in the cost folder for
        this machine (else the first call of an engine for it measures the curve, seconds on a CPU)."""
        from verifier.decoding.hf import HFBackend

        return self.cost_model is not None or self.cost_store.load(HFBackend(_loaded(model))) is not None

    def close(self) -> None:
        self.client.close()


def _loaded(model) -> LoadedModel:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    eos = model.generation_config.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    return LoadedModel(model=model, tokenizer=None, eos_token_ids=eos_ids,
                       vocab_size=int(model.get_output_embeddings().weight.shape[0]),
                       max_positions=int(getattr(config, "max_position_embeddings", 1 << 30)),
                       dtype=model.dtype, device=model.device, path=str(getattr(config, "_name_or_path", "")))


def _eos_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return list(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))


def _sampling(gc) -> SamplingParams:
    if not gc.do_sample:
        return SamplingParams()
    return SamplingParams(temperature=float(gc.temperature or 1.0), top_p=float(gc.top_p or 1.0),
                          top_k=int(gc.top_k or 0))


def _check_inputs(input_ids: torch.Tensor, attention_mask, gc, logits_processor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"specdraft generate: input_ids must be [1, prompt_len], got {list(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("specdraft generate: attention_mask must be all ones (no padding), got padding")
    if getattr(gc, "num_beams", 1) not in (None, 1):
        raise ValueError(f"specdraft generate: num_beams must be 1, got {gc.num_beams}")
    others = sorted({type(p).__name__ for p in (logits_processor or [])} - _EXPRESSIBLE)
    if others:
        raise ValueError(f"specdraft generate: logits processors must be among temperature/top-k/top-p, got {others}")
