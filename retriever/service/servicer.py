"""The `specdraft.v1.Retriever` service (grpc.aio): proto -> `validate_draft` -> `Drafter` -> proto.

Every handler runs inline on the event loop (a draft is microseconds of C++), so the
`Drafter`, which is not thread-safe, only ever runs on the loop's thread. Domain errors
become status codes through the one table, `retriever.status`; anything else is
logged and answered INTERNAL. Until `set_corpora` is called (the server loads the indexes
after it starts) every call but Describe answers UNAVAILABLE. Request contents (prompts,
drafts) are never logged. Drafts, rejections and ended sessions are counted in
`RetrieverMetrics` (`retriever.service.metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever import __version__, errors
from retriever.drafting.drafter import Drafter
from retriever.drafting.types import EncodedDraft
from retriever.service.admission import Admission, QueueWait, StreamSlots, check_deadline
from retriever.service.metrics import LOOKUP_SAMPLE_EVERY, RetrieverMetrics
from retriever.service.settings import Limits, RetrieverSettings
from retriever.service.validation import check_name, check_token_ids, validate_draft
from retriever.service.wire import encode_batch
from retriever.status import NOT_DURABLE_MARK, answer, code_of
from retriever.store.faiss_manifest import FAISS_KIND

if TYPE_CHECKING:
    from retriever.service.routing import Routing
    from retriever.store.datastore import CorpusDatastore
    from retriever.store.faiss_store import FaissStore

log = logging.getLogger(__name__)

LOADING = "indexes are still loading"
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def encode_error(error: Exception) -> pb.DraftResponse:
    """A DraftBatch item that failed: `error` set (code = the grpc.StatusCode's number), tree empty."""
    status, message = answer(error, log, "retriever")
    return pb.DraftResponse(error=pb.DraftError(code=status.grpc.value[0], message=message))


async def _answer(context: grpc.aio.ServicerContext, handle: Callable[[_Req], _Resp], request: _Req) -> _Resp:
    """`handle(request)`, or the call aborted with the status of what it raised."""
    try:
        return handle(request)
    except Exception as e:  # noqa: BLE001 - every failure becomes a status, the server never crashes
        status, message = answer(e, log, "retriever")
    await context.abort(status.grpc, message)
    raise AssertionError("unreachable: abort raises")


class _StreamSessions:
    """The sessions one DraftStream drafted for; `closed` once it ended with a status (not cancelled)."""

    __slots__ = ("drafted", "closed")

    def __init__(self) -> None:
        self.drafted: set[tuple[str, str]] = set()
        self.closed = False


class RetrieverServicer(pb_grpc.RetrieverServicer):
    """The service over one `Drafter`; `set_corpora` makes it ready. `metrics`: where calls are
    counted (default: instruments in a registry of their own). `durable`: awaited before
    EndSession answers when it ended an output (returns once the output is in the output log;
    raises Unavailable); None: EndSession answers once the output is queued. `routing`: placement
    (`retriever.service.routing`): drafts of a tenant this replica does not serve are refused."""

    def __init__(self, settings: RetrieverSettings, drafter: Drafter | None = None,
                 metrics: RetrieverMetrics | None = None,
                 durable: Callable[[], Awaitable[None]] | None = None, routing: "Routing | None" = None) -> None:
        self._settings, self._durable, self._routing = settings, durable, routing
        self.metrics = metrics if metrics is not None else RetrieverMetrics.create()
        self._drafts_seen = 0  # successful drafts, for sampling the per-index lookup times
        self._drafter = drafter if drafter is not None else Drafter(settings.drafter_config())
        self._corpora: tuple["CorpusDatastore | FaissStore", ...] = ()
        self._vocab_size = settings.vocab_size  # 0: none fixed (yet)
        self._limits: Limits | None = None  # None: not ready
        self._unavailable = LOADING
        self.admission = Admission(settings.max_inflight, settings.max_queued)
        self.queue_wait = QueueWait(round(settings.max_queue_wait_ms * 1000))
        self.streams = StreamSlots(settings.max_streams, settings.max_streams_per_peer)
        self._draining = False  # shutting down: new calls (but EndSession) are refused

    @property
    def ready(self) -> bool:
        return self._limits is not None

    def set_corpora(self, corpora: Sequence["CorpusDatastore | FaissStore"]) -> None:
        """Serve with these indexes (one tokenizer): suffix-array datastores as corpora, FAISS
        stores (manifest kind "faiss") as reference material; the vocabulary comes from them unless set."""
        faiss = [c for c in corpora if c.manifest.kind == FAISS_KIND]
        suffix_arrays = [c for c in corpora if c.manifest.kind != FAISS_KIND]
        self._drafter.set_corpora(suffix_arrays, faiss)  # type: ignore[arg-type]
        self._corpora = tuple(corpora)
        index_vocab = corpora[0].manifest.tokenizer.vocab_size if corpora else 0
        self._vocab_size = self._settings.vocab_size or index_vocab
        self._limits = self._settings.limits(self._vocab_size)
        self.metrics.set_indexes(corpora)

    def set_failed(self, reason: str) -> None:
        """Loading failed: calls answer UNAVAILABLE with `reason` instead of "still loading"."""
        self._unavailable = f"indexes failed to load: {reason}"

    def drain(self) -> None:
        """Shutting down: from now on new Draft, DraftStream, DraftBatch and Describe calls get
        UNAVAILABLE; open DraftStreams and EndSession go on."""
        self._draining = True

    def expire_idle(self) -> int:
        """Ends the idle sessions (their output goes to their tenants); returns how many."""
        ended = self._drafter.expire_idle()
        self.metrics.ended("idle", ended)
        if ended:
            log.info("ended %d idle sessions", ended)
        return ended

    def end_all_sessions(self) -> int:
        """Ends every open session (shutdown: their output goes to their tenants); returns how many."""
        ended = self._drafter.expire_idle(math.inf)
        self.metrics.ended("shutdown", ended)
        return ended

    # ------------------------------------------------------------ RPCs

    async def Draft(self, request: pb.DraftRequest, context: grpc.aio.ServicerContext) -> bytes:
        if self._draining:
            await self._refuse_draining(context, "draft")
        await self._admit(context, "draft", request.sent_unix_us)
        try:
            return await _answer(context, self._draft_measured, request)
        finally:
            self.admission.leave()

    async def DraftStream(self, request_iterator: AsyncIterator[pb.DraftRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One response per request, in order; the first failure ends the stream with its status.
        The stream holds a stream slot for its life (`StreamSlots`: beyond `max_streams` or
        `max_streams_per_peer` it is refused RESOURCE_EXHAUSTED at once); each message takes an
        admission slot while it is drafted (an idle stream holds none). A stream without a request
        for `stream_idle_s` ends with DEADLINE_EXCEEDED, and so do the sessions it drafted for. A
        cancelled stream (client cancel, deadline) ends the sessions it drafted for (their
        output goes to their tenants); anything missed still ends by idle expiry."""
        if self._draining:
            await self._refuse_draining(context, "stream")
        try:
            address = self.streams.open(context.peer())
        except errors.ResourceExhausted as e:
            self.metrics.rejections.labels("stream", code_of(e).name, "streams").inc()
            await context.abort(code_of(e), str(e))
        stream = _StreamSessions()
        context.add_done_callback(lambda _: self._stream_done(stream, address))
        code, message = None, ""
        idle_s, loop = self._settings.stream_idle_s, asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle_s) as idle:
                async for request in request_iterator:
                    idle.reschedule(loop.time() + idle_s)
                    await self._admit(context, "stream", request.sent_unix_us)
                    try:
                        response = self._draft_measured(request, "stream")
                    except Exception as e:  # noqa: BLE001
                        status, message = answer(e, log, "retriever")
                        code = status.grpc
                        break
                    finally:
                        self.admission.leave()
                    stream.drafted.add((request.tenant, request.session_id))
                    yield response
        except TimeoutError:  # no request for idle_s: the stream and its sessions end
            self._end_sessions(stream.drafted, "stream_idle")
            error = errors.DeadlineExceeded(f"DraftStream must send a request at least every {idle_s:g} s, got none "
                                            f"for {idle_s:g} s: the stream and its sessions ended")
            self.metrics.rejected("stream", code_of(error).name, str(error))
            code, message = code_of(error), str(error)
        except (asyncio.CancelledError, GeneratorExit):
            raise  # cancelled: the done callback ends the sessions
        except BaseException:
            stream.closed = True  # aborted by _admit: a status went out
            raise
        await asyncio.sleep(0)  # a client cancel shows as the end of requests, its cancellation one turn later
        stream.closed = True
        if code is not None:
            await context.abort(code, message)

    async def DraftBatch(self, request: pb.DraftBatchRequest,
                         context: grpc.aio.ServicerContext) -> bytes:
        if self._draining:
            await self._refuse_draining(context, "batch")
        await self._admit(context, "batch", request.requests[0].sent_unix_us if request.requests else 0)
        try:
            return await _answer(context, self._rejections(self._draft_batch, "batch"), request)
        finally:
            self.admission.leave()

    async def EndSession(self, request: pb.EndSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.EndSessionResponse:
        response = await _answer(context, self._rejections(self._end_session, "end_session"), request)
        self.metrics.ended("end_session")
        if self._durable is not None and response.output_tokens:
            try:
                await self._durable()
            except errors.Unavailable as e:
                status, message = answer(e, log, "retriever")
                await context.abort(status.grpc, f"{NOT_DURABLE_MARK}, got: {message}")
        return response

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        if self._draining:
            await self._refuse_draining(context, "describe")
        return await _answer(context, self._describe, request)

    # ------------------------------------------------------------ admission (retriever.service.admission)

    async def _admit(self, context: grpc.aio.ServicerContext, rpc: str, sent_unix_us: int) -> None:
        """Checks the request's wait, takes an admission slot, then checks the deadline; a refused
        call is counted and aborted (RESOURCE_EXHAUSTED "queue_wait" or "overloaded" at once, or
        DEADLINE_EXCEEDED) holding no slot."""
        try:
            self.queue_wait.check(context.peer(), sent_unix_us)
        except errors.Overloaded as e:
            self.metrics.rejections.labels(rpc, code_of(e).name, "queue_wait").inc()
            await context.abort(code_of(e), str(e))
        try:
            await self.admission.enter()
            check_deadline(context.time_remaining())
        except errors.Overloaded as e:
            self.metrics.rejections.labels(rpc, code_of(e).name, "overloaded").inc()
            await context.abort(code_of(e), str(e))
        except errors.DeadlineExceeded as e:
            self.admission.leave()
            self.metrics.rejected(rpc, code_of(e).name, str(e))
            await context.abort(code_of(e), str(e))

    async def _refuse_draining(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        error = errors.Unavailable("retriever must be serving, got a new call while it shuts down")
        self.metrics.rejected(rpc, code_of(error).name, str(error))
        await context.abort(code_of(error), str(error))

    def _stream_done(self, stream: _StreamSessions, address: str) -> None:
        """A DraftStream is over: its slot goes back; cancelled, it ends the sessions it drafted for."""
        self.streams.close(address)
        if not stream.closed:
            self._end_sessions(stream.drafted, "cancelled")

    def _end_sessions(self, drafted: set[tuple[str, str]], reason: str) -> None:
        """Ends the sessions a DraftStream drafted for (their output goes to their tenants), counted as `reason`."""
        ended = 0
        for tenant, session_id in drafted:
            try:
                self._drafter.end_session(tenant, session_id)
                ended += 1
            except errors.NotFound:  # ended meanwhile (EndSession, expiry, eviction)
                pass
        self.metrics.ended(reason, ended)

    # ------------------------------------------------------------ the work (sync, raises domain errors)

    def _require_limits(self) -> Limits:
        if self._limits is None:
            raise errors.Unavailable(self._unavailable)
        return self._limits

    def _draft(self, request: pb.DraftRequest) -> EncodedDraft:
        v = validate_draft(request.tenant, request.session_id, request.prompt, request.new_tokens,
                           request.max_nodes, self._require_limits(), request.prediction,
                           request.verified_nodes if request.HasField("verified_nodes") else None)
        if self._routing is not None:
            self._routing.check(v.tenant)
        return self._drafter.draft_response(v.tenant, v.session_id, v.prompt, v.new_tokens, v.max_nodes,
                                            v.prediction, v.verified_nodes)

    def _draft_measured(self, request: pb.DraftRequest, rpc: str = "draft") -> bytes:
        """`_draft`'s serialized DraftResponse, counted in the metrics (its time, nodes and reported
        tokens, or its failure)."""
        t0 = time.perf_counter()
        try:
            encoded = self._draft(request)
        except Exception as e:
            self.metrics.draft_failed(rpc, code_of(e).name, str(e))
            raise
        self.metrics.drafted(rpc, time.perf_counter() - t0, encoded.nodes, len(request.new_tokens),
                             len(request.prompt) > 0)
        self._drafts_seen += 1
        if self._drafts_seen % LOOKUP_SAMPLE_EVERY == 0:
            self.metrics.looked_up(self._drafter.last_lookup_s())
        return encoded.response

    def _rejections(self, handle: Callable[[_Req], _Resp], rpc: str) -> Callable[[_Req], _Resp]:
        """`handle`, its failures counted as rejections of `rpc`."""
        def counted(request: _Req) -> _Resp:
            try:
                return handle(request)
            except Exception as e:
                self.metrics.rejected(rpc, code_of(e).name, str(e))
                raise
        return counted

    def _draft_or_error(self, request: pb.DraftRequest) -> bytes:
        try:
            return self._draft_measured(request, "batch")
        except Exception as e:  # noqa: BLE001 - one item's failure is that item's error
            return encode_error(e).SerializeToString()

    def _draft_batch(self, request: pb.DraftBatchRequest) -> bytes:
        """The serialized DraftBatchResponse."""
        n, cap = len(request.requests), self._settings.max_batch
        if not 0 < n <= cap:
            raise errors.InvalidArgument(f"requests must hold 1 to {cap} drafts, got {n}")
        self._require_limits()
        return encode_batch([self._draft_or_error(r) for r in request.requests])

    def _end_session(self, request: pb.EndSessionRequest) -> pb.EndSessionResponse:
        limits = self._require_limits()
        tenant, session_id = check_name(request.tenant, "tenant"), check_name(request.session_id, "session_id")
        new = check_token_ids(request.new_tokens, "new_tokens", limits.max_new_tokens, limits.vocab_size)
        verified = request.verified_nodes if request.HasField("verified_nodes") else None
        return pb.EndSessionResponse(output_tokens=self._drafter.end_session(tenant, session_id, new, verified))

    def _describe(self, request: pb.DescribeRequest) -> pb.DescribeResponse:
        """limits.vocab_size 0: no vocabulary fixed (no indexes, no setting): any 24-bit id goes."""
        s = self._settings
        limits = pb.Limits(default_max_nodes=s.default_max_nodes, max_nodes_cap=s.max_nodes_cap,
                           vocab_size=self._vocab_size, max_context_tokens=s.max_context_tokens,
                           max_new_tokens=s.max_new_tokens, max_batch=s.max_batch, max_sessions=s.max_sessions,
                           tenant_token_budget=s.tenant_token_budget)
        response = pb.DescribeResponse(version=__version__, indexes=[index_info(c) for c in self._corpora],
                                       limits=limits, ready=self.ready)
        if self._routing is not None:
            self._routing.fill(response, request.tenant)
        return response


def index_info(corpus: "CorpusDatastore | FaissStore") -> pb.IndexInfo:
    """Describe's entry of one index; kind "suffix_array" or "faiss" (its manifest's)."""
    m = corpus.manifest
    return pb.IndexInfo(name=m.name, kind=m.kind, tokens=m.num_tokens, documents=m.num_documents,
                        tokenizer_name=m.tokenizer.name, tokenizer_sha256=m.tokenizer.sha256,
                        vocab_size=m.tokenizer.vocab_size, path=str(corpus.path))
