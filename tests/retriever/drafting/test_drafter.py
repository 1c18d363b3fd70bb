"""Drafter sessions: lifecycle, tenant prior outputs, isolation, limits."""

import doctest

import numpy as np
import pytest

import retriever.drafting.drafter as drafter_module
from retriever.drafting.drafter import Drafter
from retriever.drafting.state import MIN_REPEATED_TOKENS, repeats
from retriever.drafting.types import DrafterConfig, Source
from retriever.errors import NotFound, ResourceExhausted

EMPTY = np.empty(0, np.int32)


def ids(*tokens):
    return np.array(tokens, np.int32)


def test_module_example():
    assert doctest.testmod(drafter_module, globs={"np": np, **vars(drafter_module)}).failed == 0


def test_session_drafts_from_its_own_context_and_output():
    d = Drafter(DrafterConfig())
    first = d.draft("t", "s", ids(1, 2, 3, 9, 1, 2), EMPTY, 8)
    assert first.tree.token_ids[:2].tolist() == [3, 9] and first.context_tokens == 6
    assert set(first.tree.sources.tolist()) == {Source.CONTEXT}
    step = d.draft("t", "s", None, ids(3, 4, 5, 1, 2, 3), 8)  # output now holds "4 5" after "2 3"
    assert step.context_tokens == 12
    assert step.tree.token_ids[0] in (4, 9)
    paths = {(int(t), int(p)) for t, p in zip(step.tree.token_ids, step.tree.parents)}
    assert (4, -1) in paths and (9, -1) in paths


def test_unknown_session_needs_a_prompt():
    d = Drafter(DrafterConfig())
    with pytest.raises(NotFound, match="unknown session 's'"):
        d.draft("t", "s", None, ids(1), 8)
    with pytest.raises(NotFound):
        d.end_session("t", "s")


def test_ended_output_drafts_for_the_same_tenant_only():
    d = Drafter(DrafterConfig())
    d.draft("a", "s1", ids(100, 101), ids(7, 8, 9, 10, 11, 12), 8)
    assert d.end_session("a", "s1") == 6
    same = d.draft("a", "s2", ids(50, 7, 8), EMPTY, 8).tree
    assert same.token_ids.tolist()[:4] == [9, 10, 11, 12]
    assert set(same.sources.tolist()) == {Source.TENANT}
    other = d.draft("b", "s2", ids(50, 7, 8), EMPTY, 8).tree
    assert len(other) == 0


def test_restart_discards_the_old_session_and_lru_eviction_retires_output():
    d = Drafter(DrafterConfig(max_sessions=2))
    d.draft("a", "s1", ids(1, 2), ids(3, 4, 5), 8)
    d.draft("a", "s1", ids(1, 2, 3, 4, 5), EMPTY, 8)  # restart: the old output is in the prompt
    assert d.stats().tenants == 0
    d.draft("a", "s1", None, ids(6, 7), 8)
    d.draft("a", "s2", ids(1), EMPTY, 8)
    d.draft("a", "s3", ids(1), EMPTY, 8)  # evicts s1, the least recently used
    stats = d.stats()
    assert (stats.sessions, stats.tenants, stats.tenant_tokens) == (2, 1, 2)
    with pytest.raises(NotFound):
        d.draft("a", "s1", None, ids(1), 8)


def test_idle_sessions_expire():
    d = Drafter(DrafterConfig(session_idle_s=10))
    d.draft("a", "s1", ids(1, 2), ids(3), 8)
    assert d.expire_idle() == 0
    assert d.expire_idle(now_s=1e12) == 1
    assert d.stats().sessions == 0 and d.stats().tenant_tokens == 1


def test_context_budget_is_enforced():
    d = Drafter(DrafterConfig(max_context_tokens=5))
    with pytest.raises(ResourceExhausted, match="at most 5 tokens, got 6"):
        d.draft("a", "s", ids(1, 2, 3, 4, 5, 6), EMPTY, 8)
    d.draft("a", "s", ids(1, 2, 3), EMPTY, 8)
    with pytest.raises(ResourceExhausted, match="got 7"):
        d.draft("a", "s", None, ids(4, 5, 6, 7), 8)
    assert d.draft("a", "s", None, ids(4, 5), 8).context_tokens == 5


def test_no_match_gives_an_empty_tree_and_budget_caps_nodes():
    d = Drafter(DrafterConfig())
    assert len(d.draft("a", "s", ids(1, 2, 3), EMPTY, 64).tree) == 0
    rng = np.random.default_rng(0)
    text = rng.integers(0, 4, 2000, dtype=np.int32)
    tree = d.draft("a", "s", text, EMPTY, 16).tree
    assert len(tree) == 16 and tree.token_ids.dtype == np.int32 and tree.scores.dtype == np.float32
    assert len(d.draft("a", "s", None, ids(1), 0).tree) == 0


def test_ending_with_new_tokens_equals_a_draft_then_an_end():
    """end_session(new_tokens) reports them on the last draft and adds them to the output, exactly as
    one more draft call before the end would (twin drafters on random sessions)."""
    rng = np.random.default_rng(11)
    one, two = Drafter(DrafterConfig()), Drafter(DrafterConfig())
    for k in range(8):
        prompt = rng.integers(0, 12, int(rng.integers(2, 60))).astype(np.int32)
        middle = rng.integers(0, 12, 3).astype(np.int32)
        tail = rng.integers(0, 12, int(rng.integers(0, 8))).astype(np.int32)
        for d in (one, two):
            d.draft("t", str(k), prompt, np.empty(0, np.int32), 16)
            d.draft("t", str(k), None, middle, 16)
        if len(tail):
            one.draft("t", str(k), None, tail, 16)
        assert one.end_session("t", str(k)) == two.end_session("t", str(k), tail) == 3 + len(tail)
        np.testing.assert_array_equal(one._tenants["t"].calibration.table(), two._tenants["t"].calibration.table())
    probe = rng.integers(0, 12, 30).astype(np.int32)
    a, b = (d.draft("t", "probe", probe, np.empty(0, np.int32), 16).tree for d in (one, two))
    np.testing.assert_array_equal(a.token_ids, b.token_ids)


def test_prediction_drafts_its_continuation_and_picks_it_up_after_a_departure():
    """The predicted output is one more per-session source: the tail matched inside it, its
    continuation proposed; where the output departs and comes back, the drafts follow it again."""
    d = Drafter(DrafterConfig())
    prediction = ids(10, 11, 12, 13, 14, 15, 16, 17, 18, 19)
    tree = d.draft("t", "s", ids(1, 2, 10, 11), EMPTY, 8, prediction=prediction).tree
    assert tree.token_ids[:4].tolist() == [12, 13, 14, 15]
    assert set(tree.sources.tolist()) == {Source.PREDICTION}
    departed = d.draft("t", "s", None, ids(12, 13, 99), 8).tree  # no n-gram of the prediction ends in 99
    assert len(departed) == 0
    back = d.draft("t", "s", None, ids(15, 16), 8).tree  # the output rejoins the prediction
    assert back.token_ids[:3].tolist() == [17, 18, 19] and back.sources[0] == Source.PREDICTION
    assert [label for label, _ in d.last_lookup_s()] == ["context", "prediction", "build_tree"]


def _paths(tree) -> dict[tuple[int, ...], float]:
    """{root-to-node token path: score} of a draft tree."""
    out: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i, (t, p) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist())):
        out[i] = (out[p] if p >= 0 else ()) + (t,)
    return {out[i]: float(s) for i, s in enumerate(tree.scores.tolist())}


def test_a_prediction_agreeing_with_the_context_is_counted_once():
    """Where the context and the prediction propose the same continuation, its score is the larger
    of theirs (one piece of evidence), not their noisy-OR; the prediction's own nodes score as its
    source alone."""
    prompt = ids(1, 2, 20, 21, 22, 23, 24, 25, 26, 27, 3, 20, 21)  # the answer begins copying 20 .. 27
    prediction = ids(20, 21, 22, 23, 24, 25, 26, 27, 28, 29)  # the same text, then more: not repeated
    alone = {src: Drafter(DrafterConfig(sources=frozenset({src}))) for src in (Source.CONTEXT, Source.PREDICTION)}
    context = _paths(alone[Source.CONTEXT].draft("t", "s", prompt, EMPTY, 16).tree)
    predicted = _paths(alone[Source.PREDICTION].draft("t", "s", prompt, EMPTY, 16, prediction=prediction).tree)
    both = _paths(Drafter(DrafterConfig()).draft("t", "s", prompt, EMPTY, 16, prediction=prediction).tree)
    assert (22, 23, 24, 25, 26, 27, 28, 29) in predicted and (22, 23, 24, 25, 26, 27, 3) in context
    assert set(both) == set(context) | set(predicted)
    for path, score in both.items():
        assert score == pytest.approx(max(context.get(path, 0.0), predicted.get(path, 0.0)), rel=1e-6)
    noisy_or = 1 - (1 - context[(22,)]) * (1 - predicted[(22,)])
    assert both[(22,)] < noisy_or - 0.05  # what counting it twice gave


def test_a_prediction_the_prompt_repeats_is_no_source_of_its_own():
    """Edit clients send the file in the messages and as the prediction: the drafts are those
    without the prediction (the context proposes all it would), edge tokens merged or not."""
    file = list(range(40, 60))
    prompt = ids(1, 2, *file[:-1], 61, 3, 40, 41, 42)  # the prompt's copy ends in another token (61)
    for prediction in (ids(*file), ids(7, *file[1:])):
        with_it, without = Drafter(DrafterConfig()), Drafter(DrafterConfig())
        a = with_it.draft("t", "s", prompt, EMPTY, 16, prediction=prediction).tree
        b = without.draft("t", "s", prompt, EMPTY, 16).tree
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.scores.tolist() == b.scores.tolist()
        assert [label for label, _ in with_it.last_lookup_s()] == ["context", "build_tree"]
    shifted = Drafter(DrafterConfig())  # a token inside the copy differs: a source of its own
    shifted.draft("t", "s", ids(1, *file[:5], 99, *file[6:]), EMPTY, 16, prediction=ids(*file))
    assert [label for label, _ in shifted.last_lookup_s()] == ["context", "prediction", "build_tree"]


def _repeats_reference(prompt: list[int], prediction: list[int]) -> bool:
    core = prediction[1:-1]
    return len(prediction) >= MIN_REPEATED_TOKENS and any(
        prompt[i:i + len(core)] == core for i in range(len(prompt) - len(core) + 1))


@pytest.mark.parametrize("seed", range(30))
def test_repeats_matches_the_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        vocab = int(rng.choice([2, 3, 300, 70_000]))  # large ids: multi-byte tokens, misaligned byte hits
        prompt = rng.integers(0, vocab, int(rng.integers(0, 40))).astype(np.int32)
        if len(prompt) > 4 and rng.random() < 0.5:  # often an embedded copy, its edges changed or not
            i = int(rng.integers(0, len(prompt) - 2))
            prediction = prompt[i:i + int(rng.integers(2, 20))].copy()
            prediction[[0, -1]] = rng.integers(0, vocab, 2)
        else:
            prediction = rng.integers(0, vocab, int(rng.integers(0, 12))).astype(np.int32)
        assert repeats(prompt, prediction) == _repeats_reference(prompt.tolist(), prediction.tolist())
    # 65536 is bytes 00 00 01 00 and 256 is 00 01 00 00: the copy's bytes lie in the prompt's, 1 byte off
    assert ids(*[65536] * 9).tobytes().find(ids(*[256] * 7).tobytes()) == 1
    assert not repeats(ids(*[65536] * 9), ids(*[256] * 9))


def test_prediction_only_with_the_session_and_off_with_its_source():
    d = Drafter(DrafterConfig())
    d.draft("t", "s", ids(1, 2, 10, 11), EMPTY, 8, prediction=ids(10, 11, 12, 13))
    assert len(d.draft("t", "other", ids(1, 2, 10, 11), EMPTY, 8).tree) == 0  # another session: no prediction
    off = Drafter(DrafterConfig(sources=frozenset({Source.CONTEXT})))
    assert len(off.draft("t", "s", ids(1, 2, 10, 11), EMPTY, 8, prediction=ids(10, 11, 12, 13)).tree) == 0
    with pytest.raises(ResourceExhausted, match="at most 4 tokens, got 5"):
        Drafter(DrafterConfig(max_context_tokens=4)).draft("t", "s", ids(1), EMPTY, 8, prediction=ids(1, 2, 3, 4, 5))
