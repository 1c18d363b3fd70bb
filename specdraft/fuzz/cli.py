"""`specdraft fuzz index|requests|tree --seconds S [--seed N] [--count N]`: bounded fuzzing.

Each target runs until `--seconds` pass (or `--count` tries), prints the count tried and the
outcomes, and exits 1 when any try failed (a crash, an unexpected error or answer), else 0.
- index: corrupted index files must be rejected at load, never crash (`specdraft.fuzz.index`).
- requests: random and byte-mutated requests against a real server on loopback; every answer
  must be OK with a well-formed tree or INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED
  with a "must" message, and the server stays healthy.
- tree: random drafts over online indexes and a corpus datastore (`specdraft.fuzz.tree`).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specdraft.fuzz.index import Outcome

EXPECTED_CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class FuzzReport:
    target: str
    seed: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def tried(self) -> int:
        return len(self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    def lines(self) -> list[str]:
        by_result = Counter(o.result for o in self.outcomes)
        out = [f"fuzz {self.target}: {self.tried} tried in {self.seconds:.1f} s (seed {self.seed}); "
               + ", ".join(f"{r} {n}" for r, n in sorted(by_result.items())), "outcomes:"]
        for (result, detail), n in Counter((o.result, o.detail) for o in self.outcomes).most_common():
            out.append(f"  {n:>7}  {result:<10} {detail}")
        for o in self.failures[:10]:
            out.append(f"FAILED {o.mutation}: {o.result} {o.detail}")
        return out


def run_target(target: str, seconds: float, seed: int, count: int = 1 << 30) -> FuzzReport:
    """Runs one target for `seconds` or `count` tries."""
    t0 = time.perf_counter()
    if target == "index":
        from specdraft.fuzz.index import fuzz_index

        outcomes = fuzz_index(seconds, seed, count)
    elif target == "requests":
        outcomes = fuzz_requests(seconds, seed, count)
    else:
        outcomes = fuzz_tree(seconds, seed, count)
    return FuzzReport(target, seed, time.perf_counter() - t0, outcomes)


# ---------------------------------------------------------------- tree


def fuzz_tree(seconds: float, seed: int, count: int) -> list[Outcome]:
    from specdraft.fuzz.tree import check_case, random_case

    rng, out, deadline = random.Random(seed), [], time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix="specdraft-fuzz-tree-") as work:
        while len(out) < count and time.monotonic() < deadline:
            case = random_case(rng)
            try:
                compared = check_case(case, Path(work))
            except AssertionError as e:
                out.append(Outcome(repr(case), "unexpected", str(e)))
                continue
            out.append(Outcome("draft", "ok", "contract and reference" if compared else "contract"))
    return out


# ---------------------------------------------------------------- requests

_NAMES = ["a", "b", "", "é" * 64, "é" * 65, "x" * 129]
_CALLS = ("Draft", "DraftStream", "DraftBatch", "EndSession", "Describe")


def _ids(rng: random.Random, vocab: int) -> list[int]:
    n = rng.choice([0, 1, 3, 8, 65, 300])
    pick = rng.choice([lambda: rng.randrange(10), lambda: rng.randrange(vocab), lambda: rng.randrange(-2**31, 0),
                       lambda: rng.randrange(vocab, 2**31)])
    return [pick() if rng.random() < 0.9 else rng.randrange(10) for _ in range(n)]


def _request_bytes(rng: random.Random, rpc: str, vocab: int) -> bytes:
    """A random request of `rpc`, its wire bytes sometimes flipped, cut or extended."""
    from protos.specdraft.v1 import retriever_pb2 as pb

    def draft() -> "pb.DraftRequest":
        return pb.DraftRequest(tenant=rng.choice(_NAMES), session_id=rng.choice(_NAMES), prompt=_ids(rng, vocab),
                               new_tokens=_ids(rng, vocab), max_nodes=rng.choice([0, 1, 8, 64, 65, 2**32 - 1]))

    message = {"Draft": draft, "DraftStream": draft, "Describe": pb.DescribeRequest,
               "DraftBatch": lambda: pb.DraftBatchRequest(requests=[draft() for _ in range(rng.randint(0, 5))]),
               "EndSession": lambda: pb.EndSessionRequest(tenant=rng.choice(_NAMES),
                                                          session_id=rng.choice(_NAMES))}[rpc]()
    data = bytearray(message.SerializeToString())
    if data and rng.random() < 0.3:
        how = rng.choice(["flip", "cut", "junk"])
        if how == "flip":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == "cut":
            del data[rng.randrange(len(data)):]
        else:
            data[rng.randrange(len(data)):rng.randrange(len(data)) + 1] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


def _answer(channel, rpc: str, data: bytes) -> tuple[str, str, bytes | None]:
    """(code name, details, the first response's bytes or None)."""
    import grpc

    method = f"/specdraft.v1.Retriever/{rpc}"
    try:
        if rpc == "DraftStream":
            answers = list(channel.stream_stream(method)(iter([data]), timeout=10))
            return "OK", "", answers[0] if answers else None
        return "OK", "", channel.unary_unary(method)(data, timeout=10)
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", None


def _judge(rpc: str, code: str, details: str, raw: bytes | None, limits: tuple[int, int]) -> Outcome:
    from protos.specdraft.v1 import retriever_pb2 as pb

    if code not in EXPECTED_CODES:
        return Outcome(rpc, "unexpected", f"{code}: {details[:160]}")
    if code != "OK":
        return Outcome(rpc, code.lower(), "") if " must " in details else Outcome(rpc, "unexpected", details[:160])
    if rpc in ("Draft", "DraftStream") and raw is not None:
        tree, (vocab, cap) = pb.DraftResponse.FromString(raw).tree, limits
        n = len(tree.token_ids)
        ok = (n <= cap and all(-1 <= p < i for i, p in enumerate(tree.parents))
              and all(0 <= t < vocab for t in tree.token_ids) and list(tree.scores) == sorted(tree.scores, reverse=True))
        if not ok:
            return Outcome(rpc, "unexpected", f"malformed tree of {n} nodes")
    return Outcome(rpc, "ok", "")


def fuzz_requests(seconds: float, seed: int, count: int) -> list[Outcome]:
    """Random requests against a real server on loopback; every 50 a health probe."""
    import grpc

    from retriever.service.server import create_server
    from retriever.service.settings import RetrieverSettings
    from retriever.store.datastore import write_datastore
    from retriever.store.manifest import TokenizerInfo

    rng, out, vocab = random.Random(seed), [], 300
    with tempfile.TemporaryDirectory(prefix="specdraft-fuzz-requests-") as work:
        docs = [np.arange(5, 40, dtype=np.int32), np.tile(np.arange(7, 12, dtype=np.int32), 5)]
        write_datastore(Path(work) / "ix", docs, TokenizerInfo("fuzz", "ab" * 32, vocab), "fuzz")
        settings = RetrieverSettings(host="127.0.0.1", port=0, output_log="off", indexes=(str(Path(work) / "ix"),),
                                     max_nodes_cap=64, max_new_tokens=64, max_context_tokens=256, max_batch=4)
        server, port = create_server(settings)
        try:
            assert server.wait_ready(60), "the fuzz server must load its index"
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                deadline = time.monotonic() + seconds
                while len(out) < count and time.monotonic() < deadline:
                    rpc = rng.choice(_CALLS)
                    out.append(_judge(rpc, *_answer(channel, rpc, _request_bytes(rng, rpc, vocab)), (vocab, 64)))
                    if len(out) % 50 == 0:
                        out.append(_probe(channel))
                out.append(_probe(channel))
        finally:
            server.stop(0).wait(10)
    return out


def _probe(channel) -> Outcome:
    """A valid draft must succeed."""
    from protos.specdraft.v1 import retriever_pb2 as pb

    request = pb.DraftRequest(tenant="probe", session_id="probe", prompt=[7, 8, 9, 10, 11, 7, 8], max_nodes=4)
    code, details, raw = _answer(channel, "Draft", request.SerializeToString())
    healthy = code == "OK" and raw is not None and len(pb.DraftResponse.FromString(raw).tree.token_ids) > 0
    return Outcome("health probe", "ok" if healthy else "unexpected", "" if healthy else f"{code}: {details}")


# ---------------------------------------------------------------- the command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `fuzz index|requests|tree` to the `specdraft` parser."""
    fuzz = subparsers.add_parser("fuzz", help="bounded fuzzing: index files, requests, the tree builder")
    sub = fuzz.add_subparsers(dest="fuzz_target", required=True)
    for target, text in (("index", "corrupted index files must be rejected cleanly at load"),
                         ("requests", "random and malformed requests against a real server"),
                         ("tree", "the C++ tree builder against its contract and the slow references")):
        p = sub.add_parser(target, help=text)
        p.add_argument("--seconds", type=float, default=30.0, help="how long to run (default %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
        p.add_argument("--count", type=int, default=1 << 30, help="stop after this many tries")
        p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prints the report; 1 when any try failed."""
    report = run_target(args.fuzz_target, args.seconds, args.seed, args.count)
    print("\n".join(report.lines()), flush=True)
    return 1 if report.failures else 0
