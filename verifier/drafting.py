"""The verifier's draft sources (`verifier.decoding.engine.DraftSource`), one per generation.

- `LocalDraftSource(drafter)`: an in-process retriever `Drafter` (benchmarks, tests, the HF
  attachment's local mode): the first draft call starts the session with the prompt.
- `StreamDraftSource(session, on_fallback)`: a retriever client's `DraftStreamSession`
  (`retriever.client`); a step that gets no draft is reported to `on_fallback(reason)`:
  "timeout" (past the draft deadline), "denied" (the retriever refuses the credential),
  "error" (the session failed) or "none". Its `end()` does nothing: the generation calls
  `finish(kept_tokens)` once it knows the tokens it kept (a stop string may cut the last step),
  which hands the tokens not yet reported to the session's end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from retriever.drafting.types import DraftResult, DraftTree

if TYPE_CHECKING:
    from retriever.client import DraftStreamSession


class InProcessDrafter(Protocol):
    """What `LocalDraftSource` needs of a `retriever.drafting.drafter.Drafter`."""

    def draft(self, tenant: str, session_id: str, prompt: np.ndarray | None, new_tokens: np.ndarray,
              max_nodes: int, prediction: np.ndarray | None = None, verified_nodes: int | None = None
              ) -> DraftResult: ...

    def end_session(self, tenant: str, session_id: str, new_tokens: np.ndarray | None = None,
                    verified_nodes: int | None = None) -> int: ...


class LocalDraftSource:
    """A DraftSource over an in-process drafter (one session per generation)."""

    def __init__(self, drafter: InProcessDrafter, tenant: str = "local", session_id: str = "local",
                 prediction_ids: Sequence[int] = ()) -> None:
        """`prediction_ids`: the predicted output's tokens (Source.PREDICTION), sent with the prompt."""
        self.drafter, self.tenant, self.session_id = drafter, tenant, session_id
        self._prompt: np.ndarray | None = None
        self._prediction = np.asarray(prediction_ids, np.int32) if len(prediction_ids) else None

    def start(self, prompt_ids: list[int]) -> None:
        self._prompt = np.asarray(prompt_ids, np.int32)

    def draft(self, new_tokens: list[int], max_nodes: int, verified_nodes: int = 0) -> DraftTree | None:
        prompt, self._prompt = self._prompt, None  # the first call (re)starts the session
        prediction = self._prediction if prompt is not None else None
        tree = self.drafter.draft(self.tenant, self.session_id, prompt, np.asarray(new_tokens, np.int32),
                                  max_nodes, prediction=prediction, verified_nodes=verified_nodes).tree
        return tree if len(tree) else None

    def end(self, verified_nodes: int = 0) -> None:
        if self._prompt is None:
            self.drafter.end_session(self.tenant, self.session_id)


class StreamDraftSource:
    """A DraftSource over a retriever stream session; see the module docstring."""

    def __init__(self, session: "DraftStreamSession", on_fallback: Callable[[str], None] | None = None,
                 prediction_ids: Sequence[int] = ()) -> None:
        """`prediction_ids`: the predicted output's tokens (Source.PREDICTION), sent with the prompt."""
        self._session, self.reported, self._on_fallback = session, 0, on_fallback
        self._prediction = list(prediction_ids)
        self._verified = 0  # the engine's last report on the session's last draft

    def start(self, prompt_ids: list[int]) -> None:
        self._session.start(prompt_ids, self._prediction)

    def draft(self, new_tokens: list[int], max_nodes: int, verified_nodes: int = 0) -> DraftTree | None:
        self.reported += len(new_tokens)
        if self._on_fallback is None:
            return self._session.draft(new_tokens, max_nodes, verified_nodes)
        timeouts = self._session.timeouts
        try:
            draft = self._session.draft(new_tokens, max_nodes, verified_nodes)
        except Exception:
            self._on_fallback("error")
            raise
        if draft is None:
            timed_out = self._session.timeouts > timeouts
            self._on_fallback("timeout" if timed_out else "denied" if self._session.refused else "none")
        return draft

    def end(self, verified_nodes: int = 0) -> None:
        self._verified = verified_nodes

    def finish(self, output: Sequence[int]) -> None:
        """Ends the session, reporting the kept tokens it was not told of yet."""
        self._session.end(list(output[self.reported:]), self._verified)
