"""The drafter's per-session and per-tenant state (`retriever.drafting.drafter` owns and bounds them).

A `SessionState` is one generation: its core session (context index and last draft), its
predicted-output index (the client's prediction, one document, none where the prompt repeats it;
then the copied text rewritten with the substitutions the output made, `rewrites.Rewrites`),
reference set and accounting. A `TenantState` holds the
tenant's prior outputs (index, and the outputs themselves where reference sets read them), its
scoring calibration and its open sessions. Not thread-safe (the drafter's caller serializes).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from retriever import _core
from retriever.drafting.calibration import Calibration
from retriever.drafting.reference_set import PriorOutputs
from retriever.drafting.rewrites import SPAN, Rewrites, find
from retriever.drafting.types import DrafterConfig, Source


MIN_REPEATED_TOKENS = 8  # a shorter prediction is always a source of its own


def repeats(prompt: np.ndarray, prediction: np.ndarray) -> bool:
    """Whether `prompt` ([n] int32) holds `prediction` ([k] int32) but for its first and last token
    (an embedded copy's edge tokens merge with the text around it), k >= MIN_REPEATED_TOKENS.

    Edit clients send the file in the messages and again as the prediction: the context then
    proposes every continuation the prediction would, so the prediction is no source of its own
    (it would only count that evidence twice). Linear time (a byte search, aligned hits only).

    Example: prompt [1, 2, 30, 31, 32, 33, 34, 35, 36, 37, 3], prediction [9, 31, .., 37, 8] -> True.
    """
    if prediction.shape[0] < MIN_REPEATED_TOKENS:
        return False
    return find(np.ascontiguousarray(prompt, np.int32).tobytes(), prediction[1:-1], 0, prompt.shape[0]) >= 0


REWRITES_KEPT = 2  # rewritten documents a predicted-output index keeps besides the client's prediction


class SessionState:
    """One generation: its core session (context index and last draft), predicted-output index and
    the rewrites that feed it, reference set, idle clock and what it is accounted for (`bytes`,
    `tokens`: its memory and context length at its last step)."""

    __slots__ = ("core", "last_used_s", "reference", "reference_at", "owner", "bytes", "tokens", "prediction",
                 "rewrites")

    def __init__(self, prompt: np.ndarray, max_context_tokens: int, now_s: float, owner: "TenantState",
                 prediction: np.ndarray | None = None) -> None:
        self.core = _core.Session(prompt, max_context_tokens)
        self.last_used_s = now_s
        self.reference: _core.OnlineIndex | None = None
        self.reference_at = -1  # context length when the reference set was selected (-1: never)
        self.owner = owner
        self.bytes = 0
        self.tokens = 0
        self.prediction: _core.OnlineIndex | None = None  # predicted outputs: the client's, then rewrites
        if prediction is not None and prediction.shape[0] and not repeats(prompt, prediction):
            self.predict(prediction)
        # the texts the output may copy: the prompt, and the client's prediction where it is a source
        self.rewrites = (Rewrites(prompt),) + ((Rewrites(prediction),) if self.prediction is not None else ())

    @property
    def rewrites_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.rewrites)

    def predict(self, tokens: np.ndarray) -> None:
        """Adds one predicted output ([k] int32; a rewrite is at most SPAN tokens) to the
        predicted-output index, made on first use to hold it and REWRITES_KEPT rewrites more (past
        that the oldest documents go first, the client's prediction among them: each rewrite holds
        the rest of the text from before its substitution, every substitution learned applied)."""
        if self.prediction is None:
            self.prediction = _core.OnlineIndex(int(tokens.shape[0]) + REWRITES_KEPT * SPAN)
        self.prediction.append(tokens)
        self.prediction.end_document()

    def follow(self, new_tokens: np.ndarray) -> None:
        """The output's next tokens ([k] int32): a substitution they teach adds the rewritten text."""
        for rewrites in self.rewrites:
            doc = rewrites.extend(new_tokens)
            if doc is not None:
                self.predict(doc)

    def recent(self, n: int) -> np.ndarray:  # [<= n] int32: the last n context tokens
        return self.core.tokens(max(self.core.length - n, 0))

    def output_tokens(self) -> np.ndarray:  # [output_len] int32
        return self.core.tokens(self.core.prompt_length)


class TenantState:
    """A tenant's prior outputs (index + embeddings for reference sets), its calibration and its
    open sessions (session id -> session, least recently used first; `context_tokens`: their sum)."""

    def __init__(self, config: DrafterConfig, prior: np.ndarray) -> None:
        self.index: _core.OnlineIndex | None = None
        self.prior_outputs = PriorOutputs(config.reference)
        self._keep_outputs = Source.REFERENCE in config.sources  # only reference sets read them
        self.calibration = Calibration(prior, config.calibration)
        self._budget = config.tenant_token_budget
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.context_tokens = 0

    def _own_index(self) -> _core.OnlineIndex:
        """The prior outputs' index, made on first use."""
        if self.index is None:
            self.index = _core.OnlineIndex(self._budget)
        return self.index

    def reserve(self, positions: int) -> None:
        self._own_index().reserve(positions)

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._own_index().extend(tokens, lengths)
        if self._keep_outputs:
            for output in np.split(tokens, np.cumsum(lengths)[:-1]):
                self.prior_outputs.add(output)

    def add(self, tokens: np.ndarray) -> None:
        index = self._own_index()
        index.append(tokens)
        index.end_document()
        if self._keep_outputs:
            self.prior_outputs.add(tokens)
