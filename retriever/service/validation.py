"""Checks of one draft request's fields (pure: no grpc), run on every step, so cheap.

`validate_draft(...) -> ValidatedDraft` raises `InvalidArgument` with a
"X must be Y, got Z" message naming the first bad field (e.g.
"prompt[3] must be a token id in [0, 151936), got -5").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from retriever.errors import InvalidArgument
from retriever.service.settings import Limits

MAX_NAME_BYTES = 128  # tenant and session_id, UTF-8
_SHORT = 32  # sequences up to this long: checked as a list, converted by np.fromiter (faster)


@dataclass(slots=True)
class ValidatedDraft:
    """A checked request (read-only; not frozen, which would cost ~2 us per step)."""

    tenant: str
    session_id: str
    prompt: np.ndarray | None  # [k >= 1] int32, ids in [0, vocab); None: continue the session
    new_tokens: np.ndarray  # [k >= 0] int32, ids in [0, vocab)
    max_nodes: int  # in [1, max_nodes_cap]
    prediction: np.ndarray | None = None  # [k >= 1] int32, ids in [0, vocab); None: none
    verified_nodes: int | None = None  # nodes of the last draft the verifier tested; None: all


def check_name(value: str, what: str) -> str:
    """`value` if it is 1 to MAX_NAME_BYTES bytes of UTF-8, else InvalidArgument."""
    if not value:
        raise InvalidArgument(f"{what} must be non-empty, got ''")
    if len(value) * 4 > MAX_NAME_BYTES:  # a character is at most 4 bytes: only long names need encoding
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise InvalidArgument(f"{what} must be at most {MAX_NAME_BYTES} bytes of UTF-8, got {size} bytes")
    return value


def check_token_ids(values: Sequence[int] | np.ndarray, what: str, max_len: int, vocab_size: int) -> np.ndarray:
    """`values` (Python ints, e.g. a proto repeated int32, or an integer array [k]) as int32 [k]
    if k <= max_len and every id is in [0, vocab_size), else InvalidArgument."""
    n = len(values)
    if n > max_len:
        raise InvalidArgument(f"{what} must be at most {max_len} tokens, got {n}")
    if isinstance(values, np.ndarray):
        if values.dtype != np.int32:
            return _from_array(values, what, vocab_size)
    elif n <= _SHORT:  # a step's few ids: Python's min and max over a list beat a numpy reduction
        ids_list = list(values)
        if n and (min(ids_list) < 0 or max(ids_list) >= vocab_size):
            return _from_array(np.array(ids_list, dtype=object), what, vocab_size)
        return np.fromiter(ids_list, np.int32, n)
    try:
        ids = np.fromiter(values, np.int32, n) if n <= _SHORT else np.asarray(values, np.int32)
    except OverflowError:
        return _from_array(np.array(values, dtype=object), what, vocab_size)
    if n and ids.view(np.uint32).max() >= vocab_size:  # negatives wrap to >= 2**31: one reduction
        _raise_first_bad(ids, what, vocab_size)
    return ids


def _from_array(values: np.ndarray, what: str, vocab_size: int) -> np.ndarray:
    """The slow path: an array of another dtype, range-checked before the cast to int32."""
    if values.ndim != 1 or not (values.dtype.kind in "iu" or values.dtype == object):
        raise InvalidArgument(f"{what} must be a 1-D sequence of integer token ids, got {values.dtype} "
                              f"of shape {values.shape}")
    if values.shape[0] and (values.min() < 0 or values.max() >= vocab_size):
        _raise_first_bad(values, what, vocab_size)
    return values.astype(np.int32)


def _raise_first_bad(ids: np.ndarray, what: str, vocab_size: int) -> None:
    bad = int(np.argmax((ids < 0) | (ids >= vocab_size)))
    raise InvalidArgument(f"{what}[{bad}] must be a token id in [0, {vocab_size}), got {int(ids[bad])}")


def validate_draft(tenant: str, session_id: str, prompt: Sequence[int] | np.ndarray,
                   new_tokens: Sequence[int] | np.ndarray,
                   max_nodes: int, limits: Limits, prediction: Sequence[int] | np.ndarray = (),
                   verified_nodes: int | None = None) -> ValidatedDraft:
    """The checked request; an empty prompt means none (continue the session).

    At least one of prompt and new_tokens must be non-empty; max_nodes 0 takes the default; a
    prediction (empty: none) comes with a prompt only and has the prompt's limits.
    """
    check_name(tenant, "tenant")
    check_name(session_id, "session_id")
    prompt_ids = (check_token_ids(prompt, "prompt", limits.max_context_tokens, limits.vocab_size)
                  if len(prompt) else None)
    new_ids = check_token_ids(new_tokens, "new_tokens", limits.max_new_tokens, limits.vocab_size)
    if prompt_ids is None and not new_ids.shape[0]:
        raise InvalidArgument("prompt or new_tokens must be non-empty, got neither")
    if max_nodes < 0:
        raise InvalidArgument(f"max_nodes must be >= 0 (0: the default {limits.default_max_nodes}), got {max_nodes}")
    if max_nodes > limits.max_nodes_cap:
        raise InvalidArgument(f"max_nodes must be at most {limits.max_nodes_cap}, got {max_nodes}")
    prediction_ids = None
    if len(prediction):
        if prompt_ids is None:
            raise InvalidArgument(f"prediction must come with a prompt (a session's first call), got "
                                  f"{len(prediction)} prediction tokens without one")
        prediction_ids = check_token_ids(prediction, "prediction", limits.max_context_tokens, limits.vocab_size)
    if verified_nodes is not None and verified_nodes < 0:
        raise InvalidArgument(f"verified_nodes must be >= 0, got {verified_nodes}")
    return ValidatedDraft(tenant, session_id, prompt_ids, new_ids, max_nodes or limits.default_max_nodes,
                          prediction_ids, verified_nodes)
