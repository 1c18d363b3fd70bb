"""Property tests (hypothesis): requests against a real server, and the C++ tree builder
against the slow references of tests/reference.py.

(a) Random Draft / DraftStream / DraftBatch calls (names from a small alphabet plus edge
    cases; ids valid, negative, out of vocab or huge; counts and budgets around the caps)
    against a real server: each answer is exactly what a small model of the validation
    rules and the sessions predicts (the code; for OK the context length and a well-formed
    tree within the budget), each refusal says "X must be Y, got Z", and the server stays
    healthy. Each example ends the sessions it started, so examples are independent.
(b) Drafts that merge online indexes *and* a corpus datastore (tests/retriever/drafting/test_core.py covers
    online-only drafts and each index kind alone), with hypothesis-chosen documents, contexts
    and query knobs at their extremes, heuristic and calibrated, against `reference.build_tree`
    / `build_tree_calibrated` fed the references' own queries.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from protos.specdraft.v1 import retriever_pb2 as pb
from specdraft.fuzz.tree import Knobs, TreeCase, check_case
from tests.retriever.service.helpers import VOCAB, Running, req, settings

CAP, DEFAULT, MAX_NEW, MAX_CTX, MAX_BATCH = 16, 8, 64, 4096, 4  # tests.retriever.service.test_servicer.settings()
IA, NF, RE, OK = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.OK)
FAST = hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- (a) requests

names = st.one_of(st.sampled_from(["a", "b"]), st.sampled_from(["", "é" * 64, "é" * 65, "x" * 129, "ü"]))
token = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, 9), st.integers(-2**31, -1), st.integers(VOCAB, 2**31 - 1))
tokens = st.one_of(st.lists(st.integers(0, 20), max_size=6), st.lists(token, max_size=6))
pad = st.sampled_from([0, 0, 0, MAX_NEW - 2, MAX_NEW + 1, MAX_CTX - 3, MAX_CTX + 1])  # valid filler tokens to add
max_nodes = st.one_of(st.integers(0, CAP), st.sampled_from([CAP + 1, 2**31, 2**32 - 1]))


@st.composite
def draft_requests(draw) -> pb.DraftRequest:
    prompt, new = draw(tokens), draw(tokens)
    prompt, new = prompt + [1] * draw(pad) if prompt else prompt, new + [2] * min(draw(pad), MAX_NEW + 1)
    return pb.DraftRequest(tenant=draw(names), session_id=draw(names), prompt=prompt, new_tokens=new,
                           max_nodes=draw(max_nodes))


calls = st.lists(st.tuples(st.sampled_from(["Draft", "DraftStream", "DraftBatch"]),
                           st.lists(draft_requests(), min_size=0, max_size=5)), min_size=1, max_size=4)


def predict(model: dict[tuple[str, str], int], r: pb.DraftRequest) -> tuple[grpc.StatusCode, int]:
    """(code, context length) the rules give, applying an accepted draft to `model`."""
    if any(not n or len(n.encode()) > 128 for n in (r.tenant, r.session_id)):
        return IA, 0
    for ids, cap in ((r.prompt, MAX_CTX), (r.new_tokens, MAX_NEW)):
        if len(ids) > cap or any(not 0 <= t < VOCAB for t in ids):
            return IA, 0
    if not (r.prompt or r.new_tokens) or r.max_nodes > CAP:
        return IA, 0
    key = (r.tenant, r.session_id)
    if not r.prompt and key not in model:
        return NF, 0
    length = len(r.prompt) + len(r.new_tokens) if r.prompt else model[key] + len(r.new_tokens)
    if length > MAX_CTX:
        return RE, 0
    model[key] = length
    return OK, length


def check_tree(tree: pb.DraftTree, budget: int) -> None:
    n = len(tree.token_ids)
    assert n <= budget and len(tree.parents) == len(tree.scores) == len(tree.sources) == n
    assert all(-1 <= p < i for i, p in enumerate(tree.parents))
    assert all(0 <= t < VOCAB for t in tree.token_ids)
    assert all(0 < s <= 1 for s in tree.scores) and list(tree.scores) == sorted(tree.scores, reverse=True)
    assert set(tree.sources) <= {pb.SOURCE_CONTEXT, pb.SOURCE_TENANT, pb.SOURCE_CORPUS, pb.SOURCE_REFERENCE}


def check(model, r: pb.DraftRequest, code: grpc.StatusCode, message: str, response: pb.DraftResponse | None) -> None:
    want, length = predict(model, r)
    assert code == want, (code, message, r.tenant, r.session_id, len(r.prompt), len(r.new_tokens), r.max_nodes)
    if code == OK:
        assert response.context_tokens == length
        check_tree(response.tree, r.max_nodes or DEFAULT)
    else:
        assert " must " in message and ", got " in message, message


def run_stream(stub, model, requests) -> None:
    answers, status = [], (OK, "")
    try:
        for a in stub.DraftStream(iter(requests), timeout=10):
            answers.append(a)
    except grpc.RpcError as e:
        status = (e.code(), e.details())
    for i, r in enumerate(requests):  # answered in order; the first failure ends the stream
        if i < len(answers):
            check(model, r, OK, "", answers[i])
        else:
            check(model, r, *status, None)
            break


def run_batch(stub, model, requests) -> None:
    try:
        items = stub.DraftBatch(pb.DraftBatchRequest(requests=requests), timeout=10).responses
    except grpc.RpcError as e:
        assert not 0 < len(requests) <= MAX_BATCH
        assert (e.code(), e.details()) == (IA, f"requests must hold 1 to {MAX_BATCH} drafts, got {len(requests)}")
        return
    assert len(items) == len(requests)
    for r, item in zip(requests, items):
        code = next(c for c in grpc.StatusCode if c.value[0] == item.error.code) if item.HasField("error") else OK
        check(model, r, code, item.error.message, item)


def run_draft(stub, model, requests) -> None:
    for r in requests:
        try:
            check(model, r, OK, "", stub.Draft(r, timeout=10))
        except grpc.RpcError as e:
            check(model, r, e.code(), e.details(), None)


@pytest.fixture(scope="module")
def server(data):
    corpus, toy, _ = data
    running = Running(settings(indexes=(str(corpus),), tokenizer=str(toy)))
    assert running.server.wait_ready(30)
    yield running
    running.close()


@FAST
@given(steps=calls)
def test_every_request_gets_the_predicted_answer_and_the_server_stays_healthy(server, steps):
    stub, model = server.stub, {}
    try:
        for rpc, requests in steps:
            {"Draft": run_draft, "DraftStream": run_stream, "DraftBatch": run_batch}[rpc](stub, model, requests)
        assert stub.Draft(req("healthy", "probe", prompt=[5, 6, 5], max_nodes=2), timeout=5).context_tokens == 3
    finally:
        for tenant, session_id in [*model, ("healthy", "probe")]:
            try:
                stub.EndSession(pb.EndSessionRequest(tenant=tenant, session_id=session_id), timeout=5)
            except grpc.RpcError as e:
                assert e.code() == NF


# ---------------------------------------------------------------- (b) the tree builder

knobs = st.builds(Knobs, st.sampled_from([0, 1, 2, 3, 8, 64]), st.sampled_from([0, 1, 2, 5, 64]),
                  st.sampled_from([0, 1, 2, 3, 32]), st.sampled_from([0, 1, 4, 512]), st.sampled_from([0.5, 1.0, 2.0]),
                  st.floats(0.05, 1.5), st.floats(0.1, 8.0), st.booleans())


@st.composite
def tree_cases(draw) -> TreeCase:
    vocab = draw(st.sampled_from([2, 3, 6, 50]))
    doc = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30).map(tuple)
    docs = draw(st.lists(doc, min_size=1, max_size=5))
    subset = st.lists(st.sampled_from(docs), min_size=1, max_size=len(docs)).map(tuple)
    online = tuple(draw(st.lists(subset, max_size=3)))
    corpus = draw(st.one_of(st.just(()), subset))
    source = draw(st.sampled_from(docs))
    end = draw(st.integers(0, len(source)))
    context = tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=2))) + source[max(0, end - draw(
        st.integers(0, 30))):end]
    return TreeCase(online, tuple(draw(knobs) for _ in online), corpus, draw(knobs), context,
                    draw(st.sampled_from([0, 1, 2, 8, 64, 1000])), draw(st.sampled_from([0.0, 1e-3, 0.2, 0.9])),
                    draw(st.integers(0, 2**30)))


@hsettings(max_examples=150, deadline=None)
@given(case=tree_cases())
def test_drafts_over_online_and_corpus_indexes_match_the_references(case):
    with tempfile.TemporaryDirectory() as work:
        assert check_case(case, Path(work))  # True: the references were compared, not only the contract
