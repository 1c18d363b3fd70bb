"""Overload, deadlines and cancellation (issue 6): the admission cap with its bounded queue through a
real server (RESOURCE_EXHAUSTED at once, counted as "overloaded", the next call succeeds), a deadline
passed before drafting (DEADLINE_EXCEEDED, no state change), cancelled DraftStreams leave no
sessions or tasks (2000 here; `specdraft bench overload` runs 10k: most sessions end at the cancel,
the few whose cancel the server sees only as the end of requests end by idle expiry), and
`Admission` itself, and a real `specdraft retriever serve` subprocess at 10x its gRPC RPC bound
under load from other processes (refusals, no other errors, no crash, healthy after).
Idle expiry through the real server is tested in test_service.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import pytest

from retriever.admission import BUSY_GAP_S, Admission, AdmissionStats, DeadlineExceeded, Overloaded, check_deadline
from retriever.service import RetrieverServicer
from retriever.settings import RetrieverSettings
from specdraft.bench.overload import cancelled_streams, run_load
from specdraft.bench.server import ServerProcess
from specdraft.bench.server import wait_serving
from tests.test_service import PROMPT, Running, error_of, req, settings

CANCELLED_STREAMS = 2000  # the bench runs 10k


def on_loop(running: Running, fn):
    """fn() on the server's event loop thread (the admission is not thread-safe)."""
    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), running.server._loop).result(5)


def servicer_of(running: Running) -> RetrieverServicer:
    return running.server._inner.servicer


def rejections(servicer: RetrieverServicer, rpc: str, code: str, reason: str) -> float:
    value = servicer.metrics.registry.get_sample_value(
        "specdraft_retriever_rejections_total", {"rpc": rpc, "code": code, "reason": reason})
    return value or 0.0


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture()
def capped():
    running = Running(settings(max_inflight=1, max_queued=1))
    assert running.server.wait_ready(30)
    yield running
    running.close()


def test_beyond_the_cap_and_queue_is_resource_exhausted_at_once_then_calls_succeed(capped):
    servicer = servicer_of(capped)
    assert on_loop(capped, servicer.admission.enter_nowait)  # hold the one slot
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(capped.stub.Draft, req(session_id="q", prompt=PROMPT), timeout=5)
        assert wait_until(lambda: on_loop(capped, servicer.admission.stats) == AdmissionStats(1, 1))
        t0 = time.monotonic()
        error = error_of(capped.stub.Draft, req(session_id="x", prompt=PROMPT))
        assert time.monotonic() - t0 < 1.0
        assert (error.code(), error.details()) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "calls must be at most 1 in flight and 1 queued, got 1 in flight "
            "and 1 queued")
        assert rejections(servicer, "draft", "RESOURCE_EXHAUSTED", "overloaded") == 1
        on_loop(capped, servicer.admission.leave)  # the queued call gets the slot
        assert queued.result(5).context_tokens == len(PROMPT)
    assert capped.stub.Draft(req(session_id="x", prompt=PROMPT), timeout=5).context_tokens == len(PROMPT)
    assert on_loop(capped, servicer.admission.stats) == AdmissionStats(0, 0)


def test_stream_messages_are_refused_when_overloaded_and_an_idle_stream_holds_no_slot(capped):
    servicer = servicer_of(capped)
    replies = capped.stub.DraftStream(iter([req(session_id="st", prompt=PROMPT)]), timeout=5)
    assert [r.context_tokens for r in replies] == [len(PROMPT)]
    assert on_loop(capped, servicer.admission.stats) == AdmissionStats(0, 0)
    assert on_loop(capped, servicer.admission.enter_nowait)
    assert on_loop(capped, servicer.admission.enter_nowait) is False
    on_loop(capped, lambda: servicer.admission._waiters.append(asyncio.get_running_loop().create_future()))
    with pytest.raises(grpc.RpcError) as info:
        list(capped.stub.DraftStream(iter([req(session_id="st2", prompt=PROMPT)]), timeout=5))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rejections(servicer, "stream", "RESOURCE_EXHAUSTED", "overloaded") == 1
    on_loop(capped, servicer.admission.leave)  # to the dummy waiter
    on_loop(capped, servicer.admission.leave)
    assert on_loop(capped, servicer.admission.stats) == AdmissionStats(0, 0)


def test_a_call_whose_deadline_passes_while_queued_is_not_drafted(capped):
    servicer = servicer_of(capped)
    assert on_loop(capped, servicer.admission.enter_nowait)
    error = error_of(lambda r, timeout: capped.stub.Draft(r, timeout=0.2), req(session_id="late", prompt=PROMPT))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: on_loop(capped, servicer.admission.stats) == AdmissionStats(1, 0))
    on_loop(capped, servicer.admission.leave)
    assert error_of(capped.stub.Draft, req(session_id="late", new_tokens=[1])).code() == grpc.StatusCode.NOT_FOUND


class _Aborted(Exception):
    pass


class _Context:
    """A ServicerContext stand-in whose deadline has passed."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float:
        return -0.25

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


def test_deadline_passed_when_dequeued_is_deadline_exceeded_without_state_change():
    servicer = RetrieverServicer(RetrieverSettings(output_log="off"))
    servicer.set_corpora([])
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(servicer.Draft(req(session_id="d", prompt=PROMPT), context))
    assert context.aborted == (grpc.StatusCode.DEADLINE_EXCEEDED,
                               "deadline must not have passed when the call is drafted, got 0.250 s past it")
    assert servicer._drafter.stats().sessions == 0 and servicer.admission.stats() == AdmissionStats(0, 0)
    assert rejections(servicer, "draft", "DEADLINE_EXCEEDED", "deadline_exceeded") == 1


def test_cancelled_streams_leave_no_sessions_or_tasks():
    running = Running(settings(session_idle_s=1.0, expire_interval_s=0.2))
    try:
        assert running.server.wait_ready(30)
        servicer = servicer_of(running)
        tasks_before = on_loop(running, lambda: len(asyncio.all_tasks()))
        asyncio.run(cancelled_streams(running.port, CANCELLED_STREAMS))
        assert wait_until(lambda: on_loop(running, lambda: servicer._drafter.stats().sessions) == 0)
        assert wait_until(lambda: on_loop(running, lambda: len(asyncio.all_tasks())) <= tasks_before)
        assert on_loop(running, servicer.admission.stats) == AdmissionStats(0, 0)
        ended = {reason: servicer.metrics.registry.get_sample_value("specdraft_retriever_sessions_ended_total",
                                                                    {"reason": reason}) or 0
                 for reason in ("cancelled", "idle")}
        assert ended["cancelled"] + ended["idle"] == CANCELLED_STREAMS - CANCELLED_STREAMS // 4
        assert ended["cancelled"] >= 0.9 * (CANCELLED_STREAMS - CANCELLED_STREAMS // 4)  # the rest: idle expiry
    finally:
        running.close()


def test_admission_hands_slots_over_in_order_and_cancelled_waiters_leave_no_trace():
    async def scenario() -> list[str]:
        admission, order = Admission(1, 2), []
        await admission.enter()

        async def waiter(name: str) -> None:
            await admission.enter()
            order.append(name)
            admission.leave()

        a, b = asyncio.create_task(waiter("a")), asyncio.create_task(waiter("b"))
        await asyncio.sleep(0)
        assert admission.stats() == AdmissionStats(1, 2)
        with pytest.raises(Overloaded, match="at most 1 in flight and 2 queued, got 1 in flight and 2 queued"):
            await admission.enter()
        a.cancel()
        await asyncio.sleep(0)
        assert admission.stats() == AdmissionStats(1, 1)
        admission.leave()
        await b
        assert admission.stats() == AdmissionStats(0, 0)
        return order

    assert asyncio.run(scenario()) == ["b"]


def test_an_idle_server_drafts_at_once_and_a_busy_one_yields_first():
    """A slot taken on an idle server does not yield to the loop (no latency added); taken right
    after another call left (back-to-back arrivals) or beside a call in flight, it yields once."""
    async def yielded(admission: Admission) -> bool:
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, True)
        await admission.enter()
        return bool(ran)

    async def scenario() -> list[bool]:
        admission = Admission(2, 0)
        idle = await yielded(admission)  # never used: idle
        admission.leave()
        back_to_back = await yielded(admission)
        beside = await yielded(admission)  # the first still holds its slot
        admission.leave(), admission.leave()
        await asyncio.sleep(2 * BUSY_GAP_S)
        idle_again = await yielded(admission)
        admission.leave()
        return [idle, back_to_back, beside, idle_again]

    assert asyncio.run(scenario()) == [False, True, True, False]


def test_check_deadline_and_settings():
    check_deadline(None)
    check_deadline(0.5)
    with pytest.raises(DeadlineExceeded):
        check_deadline(0.0)
    assert RetrieverSettings.from_env({"SPECDRAFT_MAX_INFLIGHT": "8", "SPECDRAFT_MAX_QUEUED": "0"}).max_inflight == 8
    with pytest.raises(ValueError, match="SPECDRAFT_MAX_INFLIGHT must be an integer >= 1, got 0"):
        RetrieverSettings(max_inflight=0)
    with pytest.raises(ValueError, match="SPECDRAFT_MAX_QUEUED must be an integer >= 0, got -1"):
        RetrieverSettings(max_queued=-1)


def test_subprocess_server_at_10x_its_rpc_bound_refuses_some_and_stays_healthy():
    server = ServerProcess({"SPECDRAFT_MAX_INFLIGHT": "1", "SPECDRAFT_MAX_QUEUED": "1"})  # grpc holds 2 RPCs
    try:
        rss_start = server.rss_mb()
        load = run_load(server.target, 20, 2.0, processes=2, backoff_s=0.02)
        assert load.other == {} and len(load.ok_ns) > 100
        assert len(load.exhausted_ns) > 0
        assert sorted(load.exhausted_ns)[len(load.exhausted_ns) // 2] < 0.5e9  # refused without waiting its turn
        assert server.proc.poll() is None and server.rss_mb() < rss_start + 50
        wait_serving(server.target, 5)
        with grpc.insecure_channel(server.target) as channel:
            from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
            assert pb_grpc.RetrieverStub(channel).Draft(req(session_id="after", prompt=PROMPT),
                                                        timeout=5).context_tokens == len(PROMPT)
    finally:
        assert server.stop() == 0
