"""The retriever's RPCs end to end: real grpc.aio servers (`create_server`) on free loopback ports
over a real corpus datastore, real stubs: Draft (every INVALID_ARGUMENT / NOT_FOUND /
RESOURCE_EXHAUSTED path), DraftStream, DraftBatch, EndSession and tenant isolation, and the
wire bytes the core encodes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever.drafting.types import Source
from tests.retriever.service.helpers import PROMPT, VOCAB, assert_status, best_path, error_of, req, settings

# ---------------------------------------------------------------- Draft


def test_draft_continues_the_context_and_the_corpus(stub):
    r = stub.Draft(req(session_id="ok", prompt=PROMPT, max_nodes=4), timeout=5)
    assert r.context_tokens == len(PROMPT) and not r.HasField("error")
    assert best_path(r.tree) == [7, 8, 9, 5] and len(r.tree.token_ids) == 4
    assert list(r.tree.parents) == [-1, 0, 1, 2] and list(r.tree.sources) == [Source.CONTEXT] * 4
    assert list(r.tree.scores) == sorted(r.tree.scores, reverse=True)
    step = stub.Draft(req(session_id="ok", new_tokens=[7, 8]), timeout=5)
    assert step.context_tokens == len(PROMPT) + 2 and best_path(step.tree)[:2] == [9, 5]
    assert len(step.tree.token_ids) <= 8  # max_nodes 0: the default
    corpus = stub.Draft(req(session_id="corpus", prompt=[1, 2, 300, 301, 302]), timeout=5)
    # a fresh tenant scores by the calibration prior: corpus chains fade after a few nodes
    assert best_path(corpus.tree)[:3] == [303, 304, 305]
    assert corpus.tree.sources[0] == pb.SOURCE_CORPUS


def test_draft_with_a_prediction_drafts_from_it_for_the_session(stub):
    """DraftRequest.prediction (on the first call) is the session's SOURCE_PREDICTION for its life."""
    first = pb.DraftRequest(tenant="p", session_id="pred", prompt=[1, 2, 600, 601], max_nodes=4,
                            prediction=[600, 601, 602, 603, 604, 605, 606, 607])
    r = stub.Draft(first, timeout=5)
    assert best_path(r.tree) == [602, 603, 604, 605] and set(r.tree.sources) == {pb.SOURCE_PREDICTION}
    step = stub.Draft(req(tenant="p", session_id="pred", new_tokens=[602, 603], max_nodes=2), timeout=5)
    assert best_path(step.tree) == [604, 605] and step.tree.sources[0] == pb.SOURCE_PREDICTION
    plain = stub.Draft(req(tenant="p", session_id="plain", prompt=[1, 2, 600, 601], max_nodes=4), timeout=5)
    assert pb.SOURCE_PREDICTION not in set(plain.tree.sources)


@pytest.mark.parametrize("request_, details", [
    (req(prompt=[1, 2, 3, VOCAB]), f"prompt[3] must be a token id in [0, {VOCAB}), got {VOCAB}"),
    (req(prompt=[1, 2, 3, -5]), f"prompt[3] must be a token id in [0, {VOCAB}), got -5"),
    (req(prompt=[1], new_tokens=[4, -1]), f"new_tokens[1] must be a token id in [0, {VOCAB}), got -1"),
    (req(prompt=list(range(40)) + [2**31 - 1]), f"prompt[40] must be a token id in [0, {VOCAB}), got 2147483647"),
    (req(tenant="", prompt=[1]), "tenant must be non-empty, got ''"),
    (req(tenant="x" * 129, prompt=[1]), "tenant must be at most 128 bytes of UTF-8, got 129 bytes"),
    (req(tenant="é" * 65, prompt=[1]), "tenant must be at most 128 bytes of UTF-8, got 130 bytes"),
    (req(session_id="", prompt=[1]), "session_id must be non-empty, got ''"),
    (req(session_id="s" * 200, prompt=[1]), "session_id must be at most 128 bytes of UTF-8, got 200 bytes"),
    (req(prompt=[1], max_nodes=100), "max_nodes must be at most 16, got 100"),
    (req(prompt=[1] * 4097), "prompt must be at most 4096 tokens, got 4097"),
    (req(prompt=[1], new_tokens=[1] * 65), "new_tokens must be at most 64 tokens, got 65"),
    (req(), "prompt or new_tokens must be non-empty, got neither"),
])
def test_draft_rejects_invalid_requests(stub, request_, details):
    assert_status(error_of(stub.Draft, request_), grpc.StatusCode.INVALID_ARGUMENT, details)


def test_tenant_of_exactly_128_bytes_is_accepted(stub):
    assert stub.Draft(req(tenant="é" * 64, prompt=[1, 2]), timeout=5).context_tokens == 2


def test_unknown_session_is_not_found_then_a_resend_with_the_prompt_works(stub):
    e = error_of(stub.Draft, req(session_id="ghost", new_tokens=[7]))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "unknown session 'ghost'" in e.details()
    r = stub.Draft(req(session_id="ghost", prompt=PROMPT, new_tokens=[7]), timeout=5)
    assert r.context_tokens == len(PROMPT) + 1 and best_path(r.tree)[:2] == [8, 9]
    assert stub.Draft(req(session_id="ghost", new_tokens=[8]), timeout=5).context_tokens == len(PROMPT) + 2


def test_context_past_the_limit_is_resource_exhausted(stub):
    stub.Draft(req(session_id="full", prompt=[1] * 4096), timeout=5)
    e = error_of(stub.Draft, req(session_id="full", new_tokens=[2]))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096" in e.details() and "4097" in e.details()


# ---------------------------------------------------------------- DraftStream


def test_draft_stream_answers_each_step_in_order(stub):
    steps = [req(session_id="st", prompt=PROMPT, max_nodes=3), req(session_id="st", new_tokens=[7, 8, 9]),
             req(session_id="st", new_tokens=[5]), req(session_id="st", new_tokens=[6, 7], max_nodes=1)]
    responses = list(stub.DraftStream(iter(steps), timeout=5))
    assert [r.context_tokens for r in responses] == [12, 15, 16, 18]
    assert [best_path(r.tree) for r in responses] == [[7, 8, 9], [5, 6, 7, 8, 9, 5, 6, 7], [6, 7, 8, 9, 5, 6, 7, 8],
                                                      [8]]


def test_draft_stream_steps_wait_for_their_requests(stub):
    """Interactive use: each request is sent only after the previous response arrived."""
    import queue

    outbox: queue.Queue = queue.Queue()
    responses = stub.DraftStream(iter(outbox.get, None), timeout=5)
    outbox.put(req(session_id="live", prompt=PROMPT, max_nodes=2))
    assert best_path(next(responses).tree) == [7, 8]
    outbox.put(req(session_id="live", new_tokens=[7, 8]))
    assert next(responses).context_tokens == len(PROMPT) + 2
    outbox.put(None)
    assert list(responses) == []


def test_draft_stream_error_ends_the_stream_with_its_status(stub):
    steps = [req(session_id="bad", prompt=PROMPT), req(session_id="bad", new_tokens=[7]),
             req(session_id="bad", new_tokens=[VOCAB + 5]), req(session_id="bad", new_tokens=[8])]
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for r in stub.DraftStream(iter(steps), timeout=5):
            got.append(r.context_tokens)
    assert got == [12, 13]
    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT,
                  f"new_tokens[0] must be a token id in [0, {VOCAB}), got {VOCAB + 5}")
    assert stub.Draft(req(session_id="bad", new_tokens=[8]), timeout=5).context_tokens == 14  # not applied


# ---------------------------------------------------------------- DraftBatch


def test_draft_batch_reports_errors_per_item(stub):
    batch = pb.DraftBatchRequest(requests=[
        req(session_id="b1", prompt=PROMPT, max_nodes=2), req(session_id="nobody", new_tokens=[1]),
        req(session_id="b2", prompt=[1, VOCAB]), req(session_id="b1", new_tokens=[7])])
    r = stub.DraftBatch(batch, timeout=5).responses
    assert len(r) == 4
    assert best_path(r[0].tree) == [7, 8] and r[0].context_tokens == 12 and not r[0].HasField("error")
    assert r[1].error.code == grpc.StatusCode.NOT_FOUND.value[0] == 5 and "'nobody'" in r[1].error.message
    assert len(r[1].tree.token_ids) == 0 and r[1].context_tokens == 0
    assert (r[2].error.code, r[2].error.message) == (3, f"prompt[1] must be a token id in [0, {VOCAB}), got {VOCAB}")
    assert r[3].context_tokens == 13 and not r[3].HasField("error")  # items run in order


@pytest.mark.parametrize("n", [0, 5])
def test_draft_batch_of_bad_size_fails_whole(stub, n):
    batch = pb.DraftBatchRequest(requests=[req(session_id=f"z{i}", prompt=[1]) for i in range(n)])
    assert_status(error_of(stub.DraftBatch, batch), grpc.StatusCode.INVALID_ARGUMENT,
                  f"requests must hold 1 to 4 drafts, got {n}")
    if n:  # nothing ran: the sessions do not exist
        assert error_of(stub.Draft, req(session_id="z0", new_tokens=[1])).code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- EndSession


def test_ended_output_drafts_for_the_same_tenant_only(stub):
    output = [10, 11, 12, 13, 14, 15, 16, 17]
    stub.Draft(req(tenant="acme", session_id="gen1", prompt=[900, 901]), timeout=5)
    stub.Draft(req(tenant="acme", session_id="gen1", new_tokens=output), timeout=5)
    ended = stub.EndSession(pb.EndSessionRequest(tenant="acme", session_id="gen1"), timeout=5)
    assert ended.output_tokens == len(output)
    same = stub.Draft(req(tenant="acme", session_id="gen2", prompt=[50, 10, 11, 12]), timeout=5).tree
    assert best_path(same)[:5] == [13, 14, 15, 16, 17] and set(same.sources) == {pb.SOURCE_TENANT}
    other = stub.Draft(req(tenant="umbrella", session_id="gen2", prompt=[50, 10, 11, 12]), timeout=5).tree
    assert 13 not in other.token_ids and pb.SOURCE_TENANT not in other.sources
    e = error_of(stub.EndSession, pb.EndSessionRequest(tenant="acme", session_id="gen1"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "'gen1'" in e.details()
    assert error_of(stub.Draft, req(tenant="acme", session_id="gen1", new_tokens=[1])).code() == \
        grpc.StatusCode.NOT_FOUND


def test_end_session_reports_its_new_tokens_and_hands_them_over(stub):
    stub.Draft(req(tenant="acme", session_id="last", prompt=[900, 901]), timeout=5)
    stub.Draft(req(tenant="acme", session_id="last", new_tokens=[20, 21, 22]), timeout=5)
    ended = stub.EndSession(pb.EndSessionRequest(tenant="acme", session_id="last", new_tokens=[23, 24, 25]), timeout=5)
    assert ended.output_tokens == 6  # the drafts' 3 and the end's 3
    later = stub.Draft(req(tenant="acme", session_id="next", prompt=[7, 22, 23]), timeout=5).tree
    assert best_path(later)[:2] == [24, 25] and set(later.sources) == {pb.SOURCE_TENANT}
    e = error_of(stub.EndSession, pb.EndSessionRequest(tenant="acme", session_id="ghost", new_tokens=[1]))
    assert (e.code(), e.details()) == (grpc.StatusCode.NOT_FOUND,
                                       "session must exist to be ended, got unknown session 'ghost'")


def test_end_session_validates_names(stub):
    assert_status(error_of(stub.EndSession, pb.EndSessionRequest(tenant="", session_id="s")),
                  grpc.StatusCode.INVALID_ARGUMENT, "tenant must be non-empty, got ''")
    assert_status(error_of(stub.EndSession, pb.EndSessionRequest(tenant="t", session_id="é" * 100)),
                  grpc.StatusCode.INVALID_ARGUMENT, "session_id must be at most 128 bytes of UTF-8, got 200 bytes")



@pytest.mark.parametrize("seed", range(6))
def test_draft_response_is_the_draft_serialized_by_protobuf(seed):
    """Twin drafters step for step on random sessions: the core's DraftResponse bytes equal protobuf's
    serialization of the arrays `draft` returns (empty trees, -1 parents and long trees included)."""
    from retriever.drafting.drafter import Drafter

    rng = np.random.default_rng(seed)
    s = settings(max_nodes_cap=256)
    arrays, wire = Drafter(s.drafter_config()), Drafter(s.drafter_config())
    for session in range(4):
        vocab = int(rng.integers(3, 40)) if session < 3 else 2**24 - 2  # a huge vocabulary: no repeats, empty trees
        prompt = rng.integers(0, vocab, int(rng.integers(1, 200))).astype(np.int32)
        new = np.empty(0, np.int32)
        for step in range(12):
            max_nodes = int(rng.integers(1, 257))
            first = prompt if step == 0 else None
            result = arrays.draft("t", str(session), first, new, max_nodes)
            got = wire.draft_response("t", str(session), first, new, max_nodes)
            t = result.tree
            want = pb.DraftResponse(tree=pb.DraftTree(token_ids=t.token_ids.tolist(), parents=t.parents.tolist(),
                                                      scores=t.scores.tolist(), sources=t.sources.tolist()),
                                    context_tokens=result.context_tokens)
            want.tree.SetInParent()  # present even when empty
            assert got.response == want.SerializeToString() and got.nodes == len(t)
            new = rng.integers(0, vocab, int(rng.integers(0, 6))).astype(np.int32)
            if not len(new):
                new = t.token_ids[:1].copy() if len(t) else np.array([1], np.int32)


def test_encode_batch_is_the_serialized_batch_response():
    from retriever.service.wire import encode_batch

    rng = np.random.default_rng(3)
    for n in (1, 2, 7):
        items = [pb.DraftResponse(tree=pb.DraftTree(token_ids=rng.integers(0, 2**24, k).tolist(),
                                                    parents=[-1] * k), context_tokens=k)
                 if k else pb.DraftResponse(error=pb.DraftError(code=5, message="x" * 300))
                 for k in rng.integers(0, 100, n)]  # lengths of one and two varint bytes
        assert encode_batch([r.SerializeToString() for r in items]) == pb.DraftBatchResponse(
            responses=items).SerializeToString()
