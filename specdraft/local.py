"""Client-side helpers shared by `specdraft generate` and `specdraft demo`.

`generate(stub, request) -> Generation` collects one Generate stream; `in_process_retriever`
and `in_process_verifier` run the services in this process on free loopback ports (context
managers yielding host:port, stopped gracefully on exit); `verifier_stub(target)` opens a channel.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from verifier.api.settings import VerifierSettings
from verifier.decoding.stats import GenerationStats


def stats_from_proto(stats) -> GenerationStats:
    """The `GenerationStats` of a GenerateResponse's stats message (the server's own, decoded)."""
    return GenerationStats(prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, steps=stats.steps,
                           mean_accepted_tokens=stats.mean_accepted_tokens, draft_s=stats.draft_s,
                           verify_s=stats.verify_s, tokens_per_s=stats.tokens_per_s,
                           accepted_by_source={s.source: s.tokens for s in stats.accepted_by_source},
                           draft_nodes=stats.draft_nodes, accepted_draft_tokens=stats.accepted_draft_tokens,
                           wall_s=stats.wall_s)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    step_tokens: tuple[int, ...]  # tokens per streamed message (one message per model step)
    finish_reason: str
    stats: GenerationStats
    first_s: float = 0.0  # client side: seconds from the call to the first message with tokens
    total_s: float = 0.0  # client side: seconds from the call to the end of the stream


def generate(stub, request, on_text: Callable[[str], None] | None = None) -> Generation:
    """Runs one Generate call on a `VerifierStub`, collecting the stream."""
    from protos.specdraft.v1 import verifier_pb2 as pb

    parts, ids, steps, last = [], [], [], None
    t0, first_s = time.perf_counter(), 0.0
    for response in stub.Generate(request):
        parts.append(response.text)
        ids.extend(response.token_ids)
        if response.token_ids:
            first_s = first_s or time.perf_counter() - t0
            steps.append(len(response.token_ids))
        if on_text is not None and response.text:
            on_text(response.text)
        last = response
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    return Generation("".join(parts), tuple(ids), tuple(steps), reason, stats_from_proto(last.stats), first_s,
                      time.perf_counter() - t0)


@contextlib.contextmanager
def verifier_stub(target: str) -> Iterator[object]:
    """A `VerifierStub` over an insecure channel to host:port, closed on exit."""
    import grpc

    from protos.specdraft.v1 import verifier_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        yield verifier_pb2_grpc.VerifierStub(channel)


@contextlib.contextmanager
def in_process_retriever(indexes: list[Path]) -> Iterator[str]:
    """A retriever over the datastores at `indexes` on a free loopback port; yields host:port.

    It keeps tenants' outputs in the embedded local store (no Redis), as a one-machine setup does.
    """
    from retriever.service.server import create_server
    from retriever.service.settings import RetrieverSettings

    server, port = create_server(RetrieverSettings.from_env(host="127.0.0.1", port=0,
                                                            indexes=tuple(str(p) for p in indexes)))
    try:
        if not server.wait_ready(300):
            raise SystemExit(f"error: the retriever must load its indexes {[str(p) for p in indexes]}, "
                             "got a failure (see the log above)")
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(1.0).wait()


@contextlib.contextmanager
def in_process_verifier(settings: VerifierSettings, model=None) -> Iterator[str]:
    """A verifier (settings.port 0: a free port) in this process; yields host:port."""
    from verifier.api.server import create_server

    server, port = create_server(settings, model=model)
    try:
        yield f"{settings.host}:{port}"
    finally:
        server.stop(1.0).wait()
