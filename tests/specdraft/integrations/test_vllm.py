"""specdraft.integrations.vllm against a real retriever on a free loopback port, driven the way
vLLM 0.33.0's V1 model runner drives a `custom_class` proposer: a batch of rows
(`token_ids_cpu`, `num_tokens_no_spec`) condensed when a request finishes, and a fake target that
accepts the true continuation of a repeated token sequence. No vLLM here (see vllm_check)."""

from __future__ import annotations

import os
import random
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest

from retriever import errors
from retriever.client import DraftCall, RetrieverClient
from retriever.drafting.types import DraftTree
from specdraft.integrations.vllm import ProposerSettings, SpecdraftProposer, best_path
from tests.retriever.client.test_client import start_retriever, stop_retriever

K = 4
MAX_MODEL_LEN = 256
TENANT = "vllm-test"
PATTERNS = {"a": [11, 12, 13, 14, 15, 16, 17], "b": [21, 22, 23, 24, 25], "c": [31, 32, 33, 34, 35, 36],
            "d": [41, 42, 43, 44]}


def vllm_config(k: int = K, max_model_len: int = MAX_MODEL_LEN, additional: dict | None = None) -> SimpleNamespace:
    """The fields of vLLM's VllmConfig the proposer reads."""
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           model_config=SimpleNamespace(max_model_len=max_model_len),
                           additional_config=additional or {})


class RecordingClient(RetrieverClient):
    """A real client that records each DraftBatch's calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[DraftCall]] = []

    def draft_batch(self, calls, timeout_s=None):
        self.batches.append(list(calls))
        return super().draft_batch(calls, timeout_s)


class FakeRunner:
    """vLLM's input batch and a target model that accepts the true continuation (the pattern)."""

    def __init__(self, max_reqs: int = 8) -> None:
        self.tokens = np.zeros((max_reqs, MAX_MODEL_LEN), np.int32)  # [max_reqs, max_model_len]
        self.lengths = np.zeros(max_reqs, np.int32)  # [max_reqs] num_tokens_no_spec
        self.req_ids: list[str] = []  # row -> request id
        self.sampled: list[list[int]] = []  # row -> tokens accepted by the last step

    def add(self, req_id: str, repeats: int = 3) -> None:
        prompt = PATTERNS[req_id] * repeats
        row = len(self.req_ids)
        self.tokens[row, :len(prompt)], self.lengths[row] = prompt, len(prompt)
        self.req_ids.append(req_id)
        self.sampled.append([])  # a prefill: not drafting yet

    def finish(self, req_id: str) -> None:
        """Removes the request; the last row moves into its place (vLLM's condense)."""
        row, last = self.req_ids.index(req_id), len(self.req_ids) - 1
        if row != last:
            self.tokens[row], self.lengths[row] = self.tokens[last], self.lengths[last]
            self.req_ids[row], self.sampled[row] = self.req_ids[last], self.sampled[last]
        self.req_ids.pop()
        self.sampled.pop()

    def truth(self, row: int, position: int) -> int:
        pattern = PATTERNS[self.req_ids[row]]
        return pattern[position % len(pattern)]

    def step(self, drafts: list[list[int]]) -> list[int]:
        """Verifies each row's draft, appends accepted + bonus; the accepted draft tokens per row."""
        accepted = []
        for row in range(len(self.req_ids)):
            n, draft = int(self.lengths[row]), drafts[row] if drafts else []
            a = 0
            while a < len(draft) and draft[a] == self.truth(row, n + a):
                a += 1
            new = draft[:a] + [self.truth(row, n + a)]
            self.tokens[row, n:n + len(new)], self.lengths[row] = new, n + len(new)
            self.sampled[row] = new
            accepted.append(a)
        return accepted

    def propose(self, proposer: SpecdraftProposer) -> list[list[int]]:
        return proposer.propose(self.sampled, self.lengths, self.tokens, slot_mappings=None)


@pytest.fixture()
def retriever():
    server, port = start_retriever()
    yield server, port
    stop_retriever(server)


def make_proposer(port: int, deadline_ms: float = 2000.0, **kwargs) -> tuple[SpecdraftProposer, RecordingClient]:
    settings = ProposerSettings(target=f"127.0.0.1:{port}", tenant=TENANT, deadline_ms=deadline_ms, **kwargs)
    client = RecordingClient(settings.target, deadline_ms / 1000, call_timeout_s=5.0)
    return SpecdraftProposer(vllm_config(), settings=settings, client=client), client


def test_drafts_continue_the_repeated_sequence_with_incremental_sessions(retriever):
    proposer, client = make_proposer(retriever[1])
    runner = FakeRunner()
    runner.add("a"), runner.add("b")
    runner.step([])  # the prefill step samples one token per request
    for step in range(6):
        drafts = runner.propose(proposer)
        truth = [[runner.truth(r, int(runner.lengths[r]) + j) for j in range(K)] for r in range(2)]
        assert drafts == truth, f"step {step}: the drafts must continue the pattern"
        assert runner.step(drafts) == [K, K]
    assert len(client.batches) == 6 and all(len(b) == 2 for b in client.batches), "one DraftBatch per step"
    first, later = client.batches[0], client.batches[1:]
    assert [c.prompt for c in first] == [runner.tokens[r, :7 * 3 + 1 if r == 0 else 5 * 3 + 1].tolist()
                                         for r in range(2)]
    assert all(c.prompt is None and len(c.new_tokens) == K + 1 for b in later for c in b), "only new tokens"
    sid = proposer.session_ids()[0]
    reply = client.draft(TENANT, sid, new_tokens=[7], max_nodes=1, timeout_s=5)  # a probe adding 1 token
    assert reply.context_tokens - 1 == int(runner.lengths[0]) - (K + 1), "the server holds the row up to the last call"
    assert proposer.stats.sessions_started == 2 and proposer.stats.restarts == 0
    proposer.close()


def test_finished_request_ends_its_session_and_a_moved_row_keeps_its_own(retriever):
    proposer, client = make_proposer(retriever[1])
    runner = FakeRunner()
    for r in ("a", "b", "c"):
        runner.add(r)
    runner.step([])
    runner.step(runner.propose(proposer))
    sessions = proposer.session_ids()
    runner.finish("a")  # "c" moves from row 2 to row 0
    runner.add("d")  # a new request on row 2, still prefilling
    drafts = runner.propose(proposer)
    assert drafts[2] == [] and drafts[0] == [runner.truth(0, int(runner.lengths[0]) + j) for j in range(K)]
    calls = {c.session_id: c for c in client.batches[-1]}
    assert set(calls) == {sessions[1], sessions[2]}, "the moved request keeps its session"
    assert all(c.prompt is None for c in calls.values()), "a moved request sends only new tokens"
    assert proposer.session_ids() == {0: sessions[2], 1: sessions[1]}
    proposer.flush()
    assert proposer.stats.sessions_ended == 1
    with pytest.raises(errors.NotFound):  # EndSession dropped the finished request's session
        client.draft(TENANT, sessions[0], new_tokens=[1], timeout_s=5)
    runner.step(drafts)
    runner.propose(proposer)
    assert client.batches[-1][-1].prompt == runner.tokens[2, :int(runner.lengths[2])].tolist()
    proposer.close()


def test_session_forgotten_by_the_server_is_resent_in_the_same_step(retriever):
    proposer, client = make_proposer(retriever[1])
    runner = FakeRunner()
    runner.add("b")
    runner.step([])
    runner.step(runner.propose(proposer))
    client.end_session(TENANT, proposer.session_ids()[0])  # the server forgets it
    drafts = runner.propose(proposer)
    assert drafts[0] == [runner.truth(0, int(runner.lengths[0]) + j) for j in range(K)]
    assert client.batches[-1][0].prompt == runner.tokens[0, :int(runner.lengths[0])].tolist()
    assert proposer.stats.restarts == 1
    proposer.close()


def test_a_refused_row_backs_off_alone(retriever):
    proposer, client = make_proposer(retriever[1])
    runner = FakeRunner()
    runner.add("a"), runner.add("b")
    runner.tokens[1, 0] = -5  # a token id the retriever refuses (INVALID_ARGUMENT for that item only)
    runner.step([])
    drafts = runner.propose(proposer)
    assert drafts[0] and drafts[1] == [] and len(client.batches[-1]) == 2
    runner.step(drafts)
    assert runner.propose(proposer)[0] and len(client.batches[-1]) == 1, "the refused row waits out its backoff"
    proposer.close()


def test_partial_prefill_and_full_rows_get_no_draft(retriever):
    settings = ProposerSettings(target=f"127.0.0.1:{retriever[1]}", tenant=TENANT, deadline_ms=2000)
    proposer = SpecdraftProposer(vllm_config(max_model_len=24), settings=settings)
    runner = FakeRunner()
    runner.add("a")  # 21 tokens
    assert runner.propose(proposer) == [[]], "a prefilling row (nothing sampled) does not draft"
    runner.step([])  # 22 tokens: 2 left
    assert runner.propose(proposer) == [[runner.truth(0, 22), runner.truth(0, 23)]]
    runner.lengths[0] = 24
    assert runner.propose(proposer) == [[]]
    proposer.close()


def test_retriever_down_gives_empty_drafts_within_the_deadline():
    server, port = start_retriever()
    stop_retriever(server)
    proposer, client = make_proposer(port, deadline_ms=50)
    runner = FakeRunner()
    runner.add("a"), runner.add("b")
    runner.step([])
    t0 = time.monotonic()
    assert runner.propose(proposer) == [[], []]
    assert time.monotonic() - t0 < 0.5
    assert proposer.stats.failed_calls == 1
    runner.step([])
    assert runner.propose(proposer) == [[], []] and len(client.batches) == 1, "backing off: no call"
    proposer.close()


def test_silent_retriever_gives_empty_drafts_at_the_deadline():
    silent = socket.socket()  # accepts TCP connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        proposer, _ = make_proposer(silent.getsockname()[1], deadline_ms=50)
        runner = FakeRunner()
        runner.add("c")
        runner.step([])
        t0 = time.monotonic()
        assert runner.propose(proposer) == [[]]
        assert time.monotonic() - t0 < 0.5
        proposer.client.close()
    finally:
        silent.close()


def test_a_broken_client_never_raises_into_vllm():
    class Broken(RetrieverClient):
        def draft_batch(self, calls, timeout_s=None):
            raise RuntimeError("bug")

    proposer = SpecdraftProposer(vllm_config(), settings=ProposerSettings(), client=Broken("127.0.0.1:1"))
    runner = FakeRunner()
    runner.add("a")
    runner.step([])
    assert runner.propose(proposer) == [[]]
    proposer.client.close()


def test_settings_come_from_additional_config_then_environment():
    env = {"SPECDRAFT_VLLM_TENANT": "env-tenant", "SPECDRAFT_VLLM_DEADLINE_MS": "30"}
    s = ProposerSettings.from_sources({"specdraft": {"target": "r:1", "deadline_ms": 15}}, env)
    assert (s.target, s.tenant, s.deadline_ms, s.max_nodes) == ("r:1", "env-tenant", 15.0, 64)
    with pytest.raises(ValueError, match="ProposerSettings fields"):
        ProposerSettings.from_sources({"specdraft": {"targets": "r:1"}}, {})
    with pytest.raises(ValueError, match="deadline_ms"):
        ProposerSettings.from_sources(None, {"SPECDRAFT_VLLM_DEADLINE_MS": "0"})


# ---------------------------------------------------------------- best_path vs a slow reference


def best_path_reference(tree: DraftTree, k: int) -> list[int]:
    """Explicit children lists; at each level the child of highest score (ties: lowest index)."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents.tolist()):
        children.setdefault(p, []).append(i)
    path, node = [], -1
    while len(path) < k and children.get(node):
        node = sorted(children[node], key=lambda c: (-float(tree.scores[c]), c))[0]
        path.append(int(tree.token_ids[node]))
    return path


def random_tree(rng: random.Random, n: int, best_first: bool) -> DraftTree:
    parents = [rng.randrange(-1, i) for i in range(n)]
    scores = [rng.choice([0.5, 0.25, rng.random()]) for _ in range(n)]  # ties on purpose
    if best_first:  # scores never increase along the node order (the wire contract)
        scores = sorted(scores, reverse=True)
    return DraftTree(np.array([rng.randrange(1000) for _ in range(n)], np.int32), np.array(parents, np.int32),
                     np.array(scores, np.float32), np.zeros(n, np.uint8))


def test_best_path_matches_the_reference_on_random_trees():
    rng = random.Random(7)
    for trial in range(2000):
        tree = random_tree(rng, rng.randrange(0, 40), best_first=trial % 2 == 0)
        k = rng.randrange(0, 12)
        assert best_path(tree, k) == best_path_reference(tree, k), f"trial {trial}"
    assert best_path(DraftTree.empty(), 4) == []


@pytest.mark.skipif(not os.environ.get("SPECDRAFT_VLLM_WHEEL"), reason="set SPECDRAFT_VLLM_WHEEL to a vllm wheel")
def test_the_proposer_fits_the_downloaded_vllm_interface():
    from specdraft.integrations.vllm_check import mismatches, read_interface

    interface = read_interface(os.environ["SPECDRAFT_VLLM_WHEEL"])
    assert interface.version == "0.33.0" and mismatches(interface) == []
