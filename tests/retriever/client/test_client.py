"""retriever.client against a real retriever server on a free loopback port: unary helpers,
DraftStream sessions, NOT_FOUND resend, deadline fallback (server stopped, server silent) and
reconnection once the server is back."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import numpy as np
import pytest

from retriever import errors
from retriever.client import DraftCall, DraftStreamSession, RetrieverClient

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]  # a period-5 pattern: the context source continues it
DEADLINE_S = 0.05


def start_retriever(port: int = 0):
    """A real retriever server (no corpora) on 127.0.0.1:port; returns (server, port)."""
    from retriever.service.server import create_server
    from tests.retriever.service.helpers import loopback_settings

    server, port = create_server(loopback_settings(port=port, output_log="off"))
    assert server.wait_ready(10), "the retriever must load (no indexes) within 10 s"
    return server, port


def stop_retriever(server) -> None:
    server.stop(0).wait()


@pytest.fixture()
def retriever():
    server, port = start_retriever()
    yield server, port
    stop_retriever(server)


@pytest.fixture()
def client(retriever):
    c = RetrieverClient(f"127.0.0.1:{retriever[1]}", deadline_s=DEADLINE_S, call_timeout_s=5.0, backoff_s=(0.05, 0.2))
    c.wait_ready(10)
    yield c
    c.close()


def best_path(draft) -> list[int]:
    """Tokens of the chain through the first child of each node, from the root."""
    path, parent = [], -1
    for i in range(len(draft.token_ids)):
        if int(draft.parents[i]) == parent:
            path.append(int(draft.token_ids[i]))
            parent = i
    return path


def context_tokens(client: RetrieverClient, session: DraftStreamSession) -> int:
    """The server's context length of the session before this probe (which adds one token)."""
    reply = client.draft(session.tenant, session.session_id, new_tokens=[0], max_nodes=1, timeout_s=5)
    return reply.context_tokens - 1


def test_unary_helpers(client):
    reply = client.draft("t", "s1", prompt=PROMPT, max_nodes=4, timeout_s=5)
    assert reply.context_tokens == len(PROMPT)
    assert reply.tree.token_ids.tolist()[:2] == [7, 8] and reply.tree.token_ids.dtype == np.int32
    assert reply.tree.parents[0] == -1 and reply.tree.sources.dtype == np.uint8
    assert client.draft("t", "s1", new_tokens=[7, 8], max_nodes=4, timeout_s=5).context_tokens == len(PROMPT) + 2
    with pytest.raises(errors.NotFound):
        client.draft("t", "nobody", new_tokens=[1], timeout_s=5)
    batch = client.draft_batch([DraftCall("t", "s1", new_tokens=[9]), DraftCall("t", "nobody", new_tokens=[1]),
                                DraftCall("t", "s2", prompt=PROMPT)], timeout_s=5)
    assert batch[0].context_tokens == len(PROMPT) + 3
    assert isinstance(batch[1], errors.NotFound)
    assert batch[2].context_tokens == len(PROMPT)
    assert client.end_session("t", "s1") == 3
    with pytest.raises(errors.NotFound):
        client.end_session("t", "s1")
    d = client.describe()
    assert d.ready and d.limits.max_nodes_cap >= d.limits.default_max_nodes > 0


def test_stream_session_drafts_reports_tokens_and_ends(client):
    session = client.session("t")
    session.start(PROMPT)
    first = session.draft([], 8)
    assert best_path(first)[:3] == [7, 8, 9]
    assert first.token_ids.dtype == np.int32 and first.parents.dtype == np.int32  # the one DraftTree
    second = session.draft([7, 8, 9], 8)  # accepted tokens only travel as new_tokens
    assert best_path(second)[:2] == [5, 6]
    assert session.draft([], 8) is None  # nothing new to report: the step is skipped
    assert context_tokens(client, session) == len(PROMPT) + 3
    session.end([5, 6])
    assert session.closed.wait(5)
    assert session.output_tokens == 6 and session.restarts == 0 and session.timeouts == 0  # 3 + probe + 2
    assert session.draft([1], 8) is None  # ended


def test_session_forgotten_by_the_server_is_resent_with_its_output(client):
    session = client.session("t")
    session.start(PROMPT)
    assert session.draft([], 4) is not None
    assert session.draft([7, 8], 4) is not None
    client.end_session("t", session.session_id)  # the server forgets it: the next step gets NOT_FOUND
    draft = session.draft([9], 4)
    assert draft is not None and session.restarts == 1
    assert best_path(draft)[:2] == [5, 6]
    session.end()
    assert session.closed.wait(5) and session.output_tokens == 3  # the output survived the restart


def test_draft_gives_none_within_the_deadline_when_the_server_is_stopped(retriever, client):
    server, _ = retriever
    session = client.session("t")
    session.start(PROMPT)
    assert session.draft([], 4) is not None
    stop_retriever(server)
    for i in range(5):
        t0 = time.perf_counter()
        assert session.draft([7], 4) is None
        assert time.perf_counter() - t0 < DEADLINE_S + 0.03, f"step {i}"
    session.end()
    assert session.closed.wait(10) and session.output_tokens is None


def test_draft_gives_none_within_the_deadline_when_the_server_is_silent():
    silent = socket.socket()  # accepts TCP connections, never answers: calls hang until the deadline
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    client = RetrieverClient(f"127.0.0.1:{silent.getsockname()[1]}", deadline_s=DEADLINE_S)
    try:
        session = client.session("t")
        session.start(PROMPT)
        for _ in range(3):
            t0 = time.perf_counter()
            assert session.draft([7], 4) is None
            assert time.perf_counter() - t0 < DEADLINE_S + 0.03
        assert session.timeouts >= 1
    finally:
        client.close()
        silent.close()


def test_session_reconnects_when_the_server_comes_back(retriever, client):
    server, port = retriever
    session = client.session("t")
    session.start(PROMPT)
    assert session.draft([], 4) is not None
    stop_retriever(server)
    assert session.draft([7], 4) is None
    restarted, _ = start_retriever(port)
    try:
        draft, deadline = None, time.monotonic() + 10
        output = [7]
        while draft is None and time.monotonic() < deadline:
            time.sleep(0.02)
            output.append(8 if output[-1] == 7 else 7)
            draft = session.draft([output[-1]], 4)
        assert draft is not None, "no draft within 10 s of the server's restart"
        assert session.restarts == 1
        assert context_tokens(client, session) == len(PROMPT) + len(output)  # prompt + every output token resent
        session.end()
        assert session.closed.wait(5) and session.output_tokens == len(output) + 1  # + the probe
    finally:
        stop_retriever(restarted)


def test_session_is_a_draft_source():
    from verifier.decoding.engine import DraftSource  # a runtime-checkable Protocol

    client = RetrieverClient("127.0.0.1:1", deadline_s=DEADLINE_S)
    try:
        assert isinstance(client.session("t", uuid.uuid4().hex), DraftSource)
    finally:
        client.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_close_waits_for_a_session_ending_in_the_background(retriever):
    c = RetrieverClient(f"127.0.0.1:{retriever[1]}", deadline_s=DEADLINE_S, call_timeout_s=5.0)
    session = c.session("t", "closing")
    session.start([5, 6, 7, 5, 6])
    session.draft([], 4)
    session.end([7, 5])
    c.close()  # the ending thread is still running: close waits for it, the output is handed over
    assert session.closed.is_set() and session.output_tokens == 2


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_close_under_concurrent_calls_waits_for_them_and_refuses_later_ones(retriever):
    """grpc crashes the process (SIGSEGV) when a channel closes while a thread starts a call on it:
    the client must let the calls in flight leave first, then refuse new ones with a domain error."""
    for round_ in range(20):
        c = RetrieverClient(f"127.0.0.1:{retriever[1]}", deadline_s=1.0, call_timeout_s=5.0)
        c.wait_ready(10)
        refusals: list[str] = []

        def hammer(i: int) -> None:
            while True:
                try:
                    c.end_session("t", f"{round_}-{i}")
                except errors.NotFound:
                    pass
                except errors.Unavailable as e:
                    refusals.append(str(e))
                    return

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        c.close()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert refusals == [f"retriever client of 127.0.0.1:{retriever[1]} must be open, got a call after close()"] * 4
    session = c.session("t", "after-close")
    session.start(PROMPT)
    assert session.draft([], 8) is None  # no stream on a closed client: plain decoding
    session.end([1])
    assert session.closed.is_set() and session.output_tokens is None
    with pytest.raises(errors.Unavailable, match="must be open, got a call after close"):
        c.draft("t", "s", PROMPT)


def test_requests_are_stamped_with_their_send_time():
    from retriever.client.stream import draft_request

    before = time.time_ns() // 1000
    r = draft_request("t", "s", None, [1, 2], -3)
    assert before <= r.sent_unix_us <= time.time_ns() // 1000
    assert (list(r.prompt), list(r.new_tokens), r.max_nodes) == ([], [1, 2], 0)


class RecordingDrafter:
    """A real Drafter whose servicer calls are recorded: (what, verified_nodes)."""

    def __new__(cls):
        from retriever.drafting.drafter import Drafter
        from retriever.drafting.types import DrafterConfig

        class Recording(Drafter):
            def draft_response(self, tenant, session_id, prompt, new_tokens, max_nodes, prediction=None,
                               verified_nodes=None):
                self.calls.append(("draft" if prompt is None else "start", verified_nodes))
                return super().draft_response(tenant, session_id, prompt, new_tokens, max_nodes, prediction,
                                              verified_nodes)

            def end_session(self, tenant, session_id, new_tokens=None, verified_nodes=None):
                self.calls.append(("end", verified_nodes))
                return super().end_session(tenant, session_id, new_tokens, verified_nodes)
        d = Recording(DrafterConfig())
        d.calls = []
        return d


def test_the_session_tells_the_server_how_much_of_each_draft_was_verified():
    from retriever.service.server import create_server
    from tests.retriever.service.helpers import loopback_settings

    drafter = RecordingDrafter()
    server, port = create_server(loopback_settings(output_log="off"), drafter=drafter)
    client = RetrieverClient(f"127.0.0.1:{port}", deadline_s=5.0, call_timeout_s=5.0)
    try:
        assert server.wait_ready(10)
        session = client.session("t")
        session.start(PROMPT)
        assert session.draft([], 8) is not None
        assert session.draft([7], 8, verified_nodes=3) is not None  # 3 nodes of the first draft verified
        assert session.draft([99], 8, verified_nodes=2) is None  # no match after 99: an empty tree
        assert session.draft([98], 8, verified_nodes=5) is None  # ... was never seen: 0 verified, whatever said
        assert session.draft([5, 6, 7, 8, 9, 5, 6], 8, verified_nodes=5) is not None  # reports 0, as said
        assert session.draft([7], 8) is not None  # the caller says nothing: unset (all)
        session.end([8], verified_nodes=4)
        assert session.closed.wait(5)
    finally:
        client.close()
        stop_retriever(server)
    assert drafter.calls == [("start", None), ("draft", 3), ("draft", 2), ("draft", 0), ("draft", 0),
                             ("draft", None), ("end", 4)]
