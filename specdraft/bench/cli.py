"""`specdraft bench replay|latency|ablation|index|generate|log|overload|abuse|abuse-http|predicted|cluster|
attach`: the benchmarks behind the README's figures.

Each command prints a table and returns 0; `--json PATH` also writes the typed result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from specdraft.bench.replay import DEFAULT_TRACES, WORKLOADS, replay

DEFAULT_TOKENIZER = "../shared/models/qwen2.5-coder-1.5b"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `bench` and its subcommands to the `specdraft` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks: MAT replay, latency, index size")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("replay", help="MAT replay of greedy traces (through gRPC unless --in-process)")
    _traces_args(p)
    p.add_argument("--in-process", action="store_true", help="call Drafter directly, no gRPC")
    p.add_argument("--target", help="host:port of a running server (default: start one here on loopback)")
    p.add_argument("--mode", choices=("stream", "unary"), default="stream",
                   help="gRPC call per step: DraftStream (one stream per request) or unary Draft")
    p.set_defaults(run=run_replay)

    p = sub.add_parser("latency", help="draft latency: in-process, gRPC Draft, gRPC DraftStream")
    _traces_args(p)
    p.add_argument("--target", help="host:port of a running server (default: start one here on loopback)")
    p.set_defaults(run=run_latency)

    p = sub.add_parser("ablation", help="MAT by workload and in-process latency with each source on/off")
    _traces_args(p)
    p.set_defaults(run=run_ablation)

    p = sub.add_parser("index", help="corpus build rate and bytes/token; online index memory/token")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="corpus inputs to build (none: skip the build)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer dir or tokenizer.json")
    p.add_argument("--glob", help="file pattern inside directory inputs (as `index build --glob`)")
    p.add_argument("--exclude", action="append", default=[], metavar="PAT",
                   help="in directory inputs, skip entries matching PAT (repeatable)")
    p.add_argument("--exclude-ids", help="JSON list of conversation ids to leave out")
    p.add_argument("--online-tokens", type=int, default=2_000_000, help="tokens appended to the online index")
    p.add_argument("--online-source", metavar="INDEX_DIR",
                   help="take the online tokens from this datastore (default: the traces, cycled)")
    p.add_argument("--traces", default=DEFAULT_TRACES, help="JSONL traces (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(run=run_index)

    p = sub.add_parser("generate", help="end to end: tokens/s with and without drafting, HF prompt lookup, by workload")
    _traces_args(p)
    p.set_defaults(limit=3, run=run_generate)
    p.add_argument("--model", default="smollm2", help="HF folder, cached HF id, .gguf file or smollm2 (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="the traces' tokenizer (to decode their prompts)")
    p.add_argument("--no-hf", action="store_true", help="skip the anchors (HF generate plain and prompt lookup; "
                   "llama.cpp's prompt lookup)")
    p.add_argument("--backend", default="hf", choices=("hf", "llama.cpp"),
                   help="the engine under test: hf (default) or llama.cpp on a .gguf --model (or smollm2)")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default 0: every core)")
    p.add_argument("--chart", metavar="PATH", help="also write the tokens/s by workload as a PNG chart")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                   help="compare five decoders (HF eager, HF static cache + torch.compile, HF prompt lookup, "
                        "specdraft eager, specdraft with CUDA graphs): default on for --device cuda, off on a CPU")
    p.add_argument("--static-positions", type=int, default=2048,
                   help="--variants: tokens a generation may hold in the static cache (default %(default)s)")

    p = sub.add_parser("overload", help="retriever at 10x its concurrency cap: counts, p99, RSS, cancelled streams")
    p.add_argument("--cap", type=int, default=64, help="server max_inflight; 10x this many callers (default %(default)s)")
    p.add_argument("--queued", type=int, default=64, help="server max_queued (default %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="overload soak length (default %(default)s)")
    p.add_argument("--streams", type=int, default=10_000, help="cancelled DraftStreams (default %(default)s)")
    p.add_argument("--max-queue-wait-ms", type=float, default=2.0,
                   help="server max_queue_wait_ms, near the unloaded p99 (0: off; default %(default)s; "
                        "the server's own default, 5, leaves room for a noisy host)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(run=run_overload)

    p = sub.add_parser("abuse", help="retriever under a hostile client: session flood RSS vs budget, "
                                     "health and Draft while idle streams are held")
    p.add_argument("--budget-mib", type=float, default=256.0, help="server session memory budget (default %(default)s)")
    p.add_argument("--sessions", type=int, default=4000, help="sessions the flood opens (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=2000, help="prompt tokens per flood session (default %(default)s)")
    p.add_argument("--tenants", type=int, default=5000, help="one-call tenants after the flood (default %(default)s)")
    p.add_argument("--streams", type=int, default=1300, help="idle DraftStreams held (default %(default)s)")
    p.add_argument("--no-http", action="store_true",
                   help="skip the verifier part (the next request's wait after abandoned ones: `bench abuse-http`)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(run=run_abuse)

    from specdraft.bench import predicted

    p = sub.add_parser("predicted", help="edits with no / the right / a wrong prediction, and FIM: MAT, tokens/s")
    predicted.add_arguments(p)
    p.set_defaults(run=predicted.run)

    from specdraft.bench import log_bench

    p = sub.add_parser("log", help="output log: ingest rate, 10M-token warm-up, memory; Draft p99 in a Redis outage")
    log_bench.add_arguments(p)
    p.set_defaults(run=log_bench.run)

    from specdraft.bench import cluster

    p = sub.add_parser("cluster", help="tenants sharded over 3 retrievers on a Redis Cluster: memory, kill -9s")
    cluster.add_arguments(p)
    p.set_defaults(run=cluster.run)

    from specdraft.bench import attach

    p = sub.add_parser("attach", help="the HF transformers attachment's first and later calls vs plain generate")
    attach.add_arguments(p)
    p.set_defaults(run=attach.run)

    from specdraft.bench import abuse_http

    p = sub.add_parser("abuse-http", help="verifier HTTP: the next request's wait after abandoned non-streamed ones")
    abuse_http.add_arguments(p)
    p.set_defaults(run=abuse_http.run)


def run_generate(args: argparse.Namespace) -> int:
    """bench generate: the five decoders (`generate_variants`) with --variants or on CUDA, else anchors vs engine."""
    from specdraft.bench import generate, generate_variants

    return (generate_variants.run if generate_variants.wants_variants(args) else generate.run)(args)


def _traces_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traces", default=DEFAULT_TRACES, help="JSONL traces (default: %(default)s)")
    p.add_argument("--index", action="append", default=[], metavar="DIR", help="corpus datastore (repeatable)")
    p.add_argument("--max-nodes", type=int, default=64, help="draft budget per step (default: %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, help="at most this many requests per workload (first in id order)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")


def _load(args: argparse.Namespace):
    from specdraft.bench.replay import load_traces

    workloads = [w for w in args.workloads.split(",") if w]
    traces = load_traces(args.traces, workloads, args.limit)
    missing = sorted(set(workloads) - set(traces))
    if missing:
        raise SystemExit(f"error: workloads must be present in {args.traces}, missing {missing}")
    return traces


def _emit(result, path: str | None) -> None:
    print(result.table())
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_jsonable(result), indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def _jsonable(obj):
    """A dataclass tree as plain JSON values, properties (mat, ratio...) included."""
    if dataclasses.is_dataclass(obj):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name, attr in vars(type(obj)).items():
            if isinstance(attr, property):
                out[name] = _jsonable(getattr(obj, name))
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    return obj


def run_replay(args: argparse.Namespace) -> int:
    from specdraft.bench.backends import InProcessBackend
    from specdraft.bench.server import local_server

    traces = _load(args)
    if args.in_process:
        result = replay(InProcessBackend.open(args.index), traces, args.max_nodes, args.index, progress=True)
    elif args.target:
        result = _replay_grpc(args, traces, args.target)
    else:
        with local_server(args.index, args.max_nodes) as target:
            result = _replay_grpc(args, traces, target)
    _emit(result, args.json)
    return 0


def _replay_grpc(args: argparse.Namespace, traces, target: str):
    from specdraft.bench.backends import GrpcBackend

    backend = GrpcBackend(target, args.mode)
    try:
        backend.wait_ready()
        return replay(backend, traces, args.max_nodes, args.index, progress=True)
    finally:
        backend.close()


def run_latency(args: argparse.Namespace) -> int:
    from specdraft.bench.latency import run_latency as measure_all

    _emit(measure_all(_load(args), args.index, args.max_nodes, args.target), args.json)
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    from specdraft.bench.ablation import run_ablation as ablate

    _emit(ablate(_load(args), args.index, args.max_nodes), args.json)
    return 0


def run_index(args: argparse.Namespace) -> int:
    from specdraft.bench import index as ib
    from specdraft.bench.replay import load_traces

    build = None
    if args.inputs:
        options = {k: v for k, v in (("glob", args.glob), ("exclude", args.exclude),
                                     ("exclude_ids", args.exclude_ids)) if v}
        build = ib.bench_build(args.inputs, args.tokenizer, **options)
    if args.online_source:
        docs = ib.datastore_documents(args.online_source, args.online_tokens)
        source = args.online_source
    else:
        docs = ib.trace_documents(load_traces(args.traces), args.online_tokens)
        source = f"{args.traces} (cycled)"
    _emit(ib.IndexBenchResult(build, ib.bench_online(docs, source)), args.json)
    return 0


def run_overload(args: argparse.Namespace) -> int:
    from specdraft.bench.overload import run_overload as overload

    _emit(overload(args.cap, args.queued, args.seconds, streams=args.streams, max_queue_wait_ms=args.max_queue_wait_ms),
          args.json)
    return 0


def run_abuse(args: argparse.Namespace) -> int:
    """Items 1 and 2 of issue 18 (the retriever), then item 3 (`abuse-http` at its defaults) unless --no-http."""
    from specdraft.bench import abuse_http
    from specdraft.bench.abuse import run_abuse as abuse

    _emit(abuse(args.budget_mib, args.sessions, args.prompt_tokens, args.tenants, args.streams), args.json)
    if args.no_http:
        return 0
    http = argparse.ArgumentParser()
    abuse_http.add_arguments(http)
    return abuse_http.run(http.parse_args([]))
