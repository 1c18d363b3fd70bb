"""Request validation (`retriever.service.validation`, pure) and the settings it is configured by
(`retriever.service.settings`): exact messages, the first bad id found (property-tested against a plain
loop), array inputs without wrap-around, per-step cost, environment parsing and its errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retriever.errors import InvalidArgument
from retriever.service.settings import MAX_VOCAB_SIZE, Limits, RetrieverSettings, env_name
from retriever.service.validation import ValidatedDraft, check_name, check_token_ids, validate_draft

LIMITS = Limits(default_max_nodes=8, max_nodes_cap=64, vocab_size=151936, max_context_tokens=1000,
                max_new_tokens=16, max_batch=4)


def invalid(*args, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidArgument) as info:
        validate_draft(*args, limits=limits)
    return str(info.value)


# ---------------------------------------------------------------- validate_draft


def test_valid_request_gives_int32_arrays_and_the_default_budget():
    v = validate_draft("t", "s", [1, 2, 151935], [4], 0, LIMITS)
    assert isinstance(v, ValidatedDraft) and (v.tenant, v.session_id, v.max_nodes) == ("t", "s", 8)
    assert v.prompt.dtype == np.int32 and v.prompt.tolist() == [1, 2, 151935]
    assert v.new_tokens.dtype == np.int32 and v.new_tokens.tolist() == [4]
    step = validate_draft("t", "s", [], [7, 8], 64, LIMITS)
    assert step.prompt is None and step.new_tokens.tolist() == [7, 8] and step.max_nodes == 64
    restart = validate_draft("t", "s", list(range(100)), [], 3, LIMITS)
    assert restart.prompt.shape == (100,) and restart.new_tokens.shape == (0,) and restart.new_tokens.dtype == np.int32
    assert step.verified_nodes is None and validate_draft("t", "s", [], [7], 0, LIMITS, (), 3).verified_nodes == 3


def test_verified_nodes_must_not_be_negative():
    with pytest.raises(InvalidArgument, match="verified_nodes must be >= 0, got -1"):
        validate_draft("t", "s", [], [7], 0, LIMITS, (), -1)


@pytest.mark.parametrize("args, message", [
    (("t", "s", [1, 2, 3, -5], [], 0), "prompt[3] must be a token id in [0, 151936), got -5"),
    (("t", "s", [151936], [], 0), "prompt[0] must be a token id in [0, 151936), got 151936"),
    (("t", "s", list(range(50)) + [-1], [], 0), "prompt[50] must be a token id in [0, 151936), got -1"),
    (("t", "s", [1], [2, 3, 2**31 - 1], 0), "new_tokens[2] must be a token id in [0, 151936), got 2147483647"),
    (("t", "s", [1], [2**40], 0), "new_tokens[0] must be a token id in [0, 151936), got 1099511627776"),
    (("t", "s", [1] * 1001, [], 0), "prompt must be at most 1000 tokens, got 1001"),
    (("t", "s", [], [1] * 17, 0), "new_tokens must be at most 16 tokens, got 17"),
    (("t", "s", [], [], 0), "prompt or new_tokens must be non-empty, got neither"),
    (("t", "s", [1], [], 100), "max_nodes must be at most 64, got 100"),
    (("t", "s", [1], [], -1), "max_nodes must be >= 0 (0: the default 8), got -1"),
    (("", "s", [1], [], 0), "tenant must be non-empty, got ''"),
    (("t", "", [1], [], 0), "session_id must be non-empty, got ''"),
    (("x" * 129, "s", [1], [], 0), "tenant must be at most 128 bytes of UTF-8, got 129 bytes"),
    (("t", "日" * 43, [1], [], 0), "session_id must be at most 128 bytes of UTF-8, got 129 bytes"),
])
def test_invalid_requests_name_the_first_bad_field(args, message):
    assert invalid(*args) == message


def test_checks_run_in_field_order():
    assert invalid("", "", [-1], [-1], 999).startswith("tenant")
    assert invalid("t", "", [-1], [-1], 999).startswith("session_id")
    assert invalid("t", "s", [-1], [-1], 999).startswith("prompt[0]")
    assert invalid("t", "s", [1], [-1], 999).startswith("new_tokens[0]")


@pytest.mark.parametrize("name, ok", [("x" * 128, True), ("é" * 64, True), ("é" * 65, False), ("😀" * 32, True),
                                      ("😀" * 32 + "x", False), ("a", True)])
def test_names_are_measured_in_utf8_bytes(name, ok):
    if ok:
        assert check_name(name, "tenant") == name
    else:
        with pytest.raises(InvalidArgument, match="tenant must be at most 128 bytes of UTF-8"):
            check_name(name, "tenant")


@given(st.lists(st.integers(-2**31, 2**31 - 1), max_size=80), st.integers(1, MAX_VOCAB_SIZE))
def test_token_ids_match_a_plain_loop(values, vocab):
    bad = next((i for i, v in enumerate(values) if not 0 <= v < vocab), None)
    if bad is None:
        ids = check_token_ids(values, "prompt", 1000, vocab)
        assert ids.dtype == np.int32 and ids.tolist() == values
    else:
        with pytest.raises(InvalidArgument) as info:
            check_token_ids(values, "prompt", 1000, vocab)
        assert str(info.value) == f"prompt[{bad}] must be a token id in [0, {vocab}), got {values[bad]}"


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.int16])
def test_integer_arrays_are_range_checked_before_the_cast(dtype):
    assert check_token_ids(np.array([1, 2], dtype), "p", 10, 100).dtype == np.int32
    big = np.array([5, 2**32 + 3 if dtype == np.int64 else np.iinfo(dtype).max], dtype)  # wraps into range as int32
    with pytest.raises(InvalidArgument, match=r"p\[1\] must be a token id in \[0, 100\), got \d{3,}"):
        check_token_ids(big, "p", 10, 100)


def test_int32_arrays_and_non_integer_arrays():
    ids = np.array([3, 4], np.int32)
    assert check_token_ids(ids, "p", 10, 100).tolist() == [3, 4]
    with pytest.raises(InvalidArgument, match="p must be a 1-D sequence of integer token ids, got float64"):
        check_token_ids(np.array([1.0, 2.0]), "p", 10, 100)
    with pytest.raises(InvalidArgument, match="got int64 of shape"):
        check_token_ids(np.zeros((2, 2), np.int64), "p", 10, 100)


# ---------------------------------------------------------------- settings


def test_defaults_and_narrow_views():
    s = RetrieverSettings.from_env({})
    assert (s.host, s.port, s.indexes, s.default_max_nodes, s.max_nodes_cap, s.vocab_size) == \
        ("0.0.0.0", 50051, (), 64, 64, 0)
    assert (s.max_context_tokens, s.max_new_tokens, s.max_batch, s.max_sessions, s.session_idle_s) == \
        (131072, 4096, 256, 100_000, 900.0)
    assert (s.tenant_token_budget, s.reflection, s.tokenizer, s.grace_s) == (2_000_000, False, "", 5.0)
    c = s.drafter_config()
    assert (c.max_sessions, c.session_idle_s, c.tenant_token_budget, c.max_context_tokens) == \
        (100_000, 900.0, 2_000_000, 131072)
    assert s.limits() == Limits(64, 64, MAX_VOCAB_SIZE, 131072, 4096, 256)
    assert s.limits(151936).vocab_size == 151936
    assert s.replace(vocab_size=32000).limits(151936).vocab_size == 32000


def test_environment_values_and_overrides():
    env = {"SPECDRAFT_HOST": "127.0.0.1", "SPECDRAFT_PORT": "0", "SPECDRAFT_INDEX_DIRS": os.pathsep.join(["/a", "/b", ""]),
           "SPECDRAFT_DEFAULT_MAX_NODES": "16", "SPECDRAFT_MAX_NODES_CAP": "128", "SPECDRAFT_VOCAB_SIZE": "151936",
           "SPECDRAFT_MAX_CONTEXT_TOKENS": "2048", "SPECDRAFT_MAX_NEW_TOKENS": "32", "SPECDRAFT_MAX_BATCH": "8",
           "SPECDRAFT_MAX_SESSIONS": "10", "SPECDRAFT_SESSION_IDLE_S": "1.5", "SPECDRAFT_TENANT_TOKEN_BUDGET": "99",
           "SPECDRAFT_REFLECTION": "1", "SPECDRAFT_TOKENIZER": "/tok", "SPECDRAFT_GRACE_S": "0",
           "SPECDRAFT_UNRELATED": "x"}
    s = RetrieverSettings.from_env(env)
    assert s == RetrieverSettings(host="127.0.0.1", port=0, indexes=("/a", "/b"), default_max_nodes=16,
                                  max_nodes_cap=128, vocab_size=151936, max_context_tokens=2048, max_new_tokens=32,
                                  max_batch=8, max_sessions=10, session_idle_s=1.5, tenant_token_budget=99,
                                  reflection=True, tokenizer="/tok", grace_s=0.0)
    o = RetrieverSettings.from_env(env, port=7, indexes=["/c"], reflection=False, host=None)
    assert (o.port, o.indexes, o.reflection, o.host) == (7, ("/c",), False, "127.0.0.1")
    assert RetrieverSettings.from_env({"SPECDRAFT_REFLECTION": "off"}).reflection is False
    assert env_name("indexes") == "SPECDRAFT_INDEX_DIRS" and env_name("grace_s") == "SPECDRAFT_GRACE_S"


@pytest.mark.parametrize("env, message", [
    ({"SPECDRAFT_PORT": "http"}, "SPECDRAFT_PORT must be an integer, got 'http'"),
    ({"SPECDRAFT_PORT": "65536"}, "SPECDRAFT_PORT must be an integer in [0, 65535], got 65536"),
    ({"SPECDRAFT_GRACE_S": "-1"}, "SPECDRAFT_GRACE_S must be a finite number of seconds >= 0, got -1.0"),
    ({"SPECDRAFT_SESSION_IDLE_S": "nan"}, "SPECDRAFT_SESSION_IDLE_S must be a finite number of seconds > 0, got nan"),
    ({"SPECDRAFT_REFLECTION": "maybe"}, "SPECDRAFT_REFLECTION must be 0 or 1 (or true/false), got 'maybe'"),
    ({"SPECDRAFT_MAX_BATCH": "0"}, "SPECDRAFT_MAX_BATCH must be an integer >= 1, got 0"),
    ({"SPECDRAFT_VOCAB_SIZE": "16777215"},
     "SPECDRAFT_VOCAB_SIZE must be an integer in [0, 16777214] (0: the indexes'), got 16777215"),
    ({"SPECDRAFT_MAX_NODES_CAP": "8"}, "SPECDRAFT_DEFAULT_MAX_NODES must be at most SPECDRAFT_MAX_NODES_CAP=8, got 64"),
    ({"SPECDRAFT_HOST": ""}, "SPECDRAFT_HOST must be a non-empty host name or address, got ''"),
])
def test_bad_environment_values_name_the_variable(env, message):
    with pytest.raises(ValueError) as info:
        RetrieverSettings.from_env(env)
    assert str(info.value) == message


def test_bad_overrides_are_refused_too():
    with pytest.raises(ValueError, match="SPECDRAFT_PORT must be an integer in"):
        RetrieverSettings(port=True)
    with pytest.raises(ValueError, match="SPECDRAFT_MAX_NODES_CAP must be an integer in \\[1, 4096\\], got 5000"):
        RetrieverSettings(max_nodes_cap=5000, default_max_nodes=1)
    with pytest.raises(ValueError, match="SPECDRAFT_INDEX_DIRS must be a tuple of non-empty directory paths"):
        RetrieverSettings(indexes=("",))
