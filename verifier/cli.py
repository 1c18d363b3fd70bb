"""`specdraft verifier serve`, `specdraft generate` and `specdraft demo` (verifier.demo).

- `verifier serve`: the gRPC verifier and its OpenAI-compatible HTTP API (`--http-port`, -1: off)
  (settings: flags > SPECDRAFT_VERIFIER_* > defaults; the API key only from SPECDRAFT_VERIFIER_API_KEY;
  secrets only in files: `--auth-tokens`, `--retriever-token-file`; see SECURITY.md).
- `generate`: prompts from the arguments or a JSONL file (`{"prompt": str}`, `{"messages": [...]}`
  or `{"prompt_ids": [...]}`, optional `"id"`, `"max_new_tokens"`) through a verifier: the one at
  `--verifier`, else one started in-process, drafting through `--retriever host:port`, or a
  retriever started in-process over `--index` datastores; `--no-draft` for the baseline
  (`--verifier-token-file`: the bearer token of an authenticated verifier; an in-process verifier has no auth).
  Text goes to stdout (streamed), stats to stderr (`--json`: one JSON object per prompt).
- `demo`: the README's main job (see verifier.demo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

from verifier.local import Generation, generate, in_process_retriever, in_process_verifier, verifier_stub
from verifier.settings import VerifierSettings


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model id, local directory, GGUF file or 'smollm2' (default)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--cache-dir", help="where converted models are cached (default <repo>/.cache/models)")
    p.add_argument("--max-nodes", type=int, help="draft nodes asked per step (default 64)")
    p.add_argument("--draft-deadline-ms", type=float, help="per-draft deadline (default 50)")


_IN_PROCESS = dict(auth_tokens_file="", tls_cert="", tls_key="", tls_client_ca="")  # a loopback verifier of this CLI


def _retriever_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retriever-token-file", metavar="FILE",
                   help="file holding the bearer token for the retriever (SPECDRAFT_VERIFIER_RETRIEVER_TOKEN_FILE)")
    p.add_argument("--retriever-ca", metavar="PEM",
                   help="CA bundle the retriever's certificate must chain to; turns TLS on "
                        "(SPECDRAFT_VERIFIER_RETRIEVER_CA)")
    p.add_argument("--retriever-tls", action="store_true", default=None,
                   help="TLS to the retriever with the system's CA roots (SPECDRAFT_VERIFIER_RETRIEVER_TLS)")
    p.add_argument("--retriever-client-cert", metavar="PEM",
                   help="client certificate for mTLS, with --retriever-client-key "
                        "(SPECDRAFT_VERIFIER_RETRIEVER_CLIENT_CERT)")
    p.add_argument("--retriever-client-key", metavar="PEM", help="(SPECDRAFT_VERIFIER_RETRIEVER_CLIENT_KEY)")
    p.add_argument("--retriever-server-name", metavar="NAME",
                   help="the name the retriever's certificate must hold (default: its host; "
                        "SPECDRAFT_VERIFIER_RETRIEVER_SERVER_NAME)")


def _settings(args: argparse.Namespace, **overrides: object) -> VerifierSettings:
    deadline = getattr(args, "draft_deadline_ms", None)
    security = {name: getattr(args, name, None) for name in (
        "retriever_token_file", "retriever_ca", "retriever_tls", "retriever_client_cert", "retriever_client_key",
        "retriever_server_name")}
    return VerifierSettings.from_env(
        model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir, max_nodes=args.max_nodes,
        draft_deadline_s=deadline / 1000 if deadline is not None else None, **security, **overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    verifier = subparsers.add_parser("verifier", help="the verifier service (target model + tree verification)")
    vsub = verifier.add_subparsers(dest="verifier_command", required=True)
    serve = vsub.add_parser("serve", help="serve specdraft.v1.Verifier over gRPC and the OpenAI API over HTTP")
    _model_args(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="gRPC port (default 50052; 0: a free port)")
    serve.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8000; 0: free; -1: off)")
    serve.add_argument("--served-model-name", help="the model's name in the HTTP API (default: --model)")
    serve.add_argument("--retriever", help="host:port of a retriever (none: no drafting)")
    serve.add_argument("--metrics-port", type=int,
                       help="Prometheus /metrics on a port of its own (default -1: off; always at the HTTP API's "
                            "/metrics)")
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="log lines as text or one JSON object each (SPECDRAFT_LOG_FORMAT; default text)")
    serve.add_argument("--tls-cert", metavar="PEM",
                       help="TLS certificate chain of the gRPC and HTTP servers (SPECDRAFT_VERIFIER_TLS_CERT)")
    serve.add_argument("--tls-key", metavar="PEM", help="TLS private key (SPECDRAFT_VERIFIER_TLS_KEY)")
    serve.add_argument("--tls-client-ca", metavar="PEM",
                       help="require client certificates signed by this CA: mTLS (SPECDRAFT_VERIFIER_TLS_CLIENT_CA)")
    serve.add_argument("--auth-tokens", metavar="FILE",
                       help="bearer tokens bound to tenants for the HTTP and gRPC APIs, lines 'TOKEN TENANTS [admin]' "
                            "or JSON (SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE; default: no auth, see SECURITY.md)")
    _retriever_security_args(serve)
    serve.set_defaults(run=_serve)

    gen = subparsers.add_parser("generate", help="generate text for prompts (drafting through a retriever)")
    gen.add_argument("prompts", nargs="*", help="raw completion prompts (with --chat: user messages)")
    gen.add_argument("--jsonl", type=Path, help="prompts, one JSON object per line")
    gen.add_argument("--chat", action="store_true", help="send the argument prompts as chat user messages")
    gen.add_argument("--max-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--tenant", default="")
    gen.add_argument("--no-draft", action="store_true", help="plain decoding (the baseline)")
    gen.add_argument("--verifier", help="host:port of a running verifier (none: start one in-process)")
    gen.add_argument("--retriever", help="host:port of a running retriever")
    gen.add_argument("--index", action="append", default=[], help="datastore for an in-process retriever")
    gen.add_argument("--json", action="store_true", help="one JSON object (id, text, stats) per prompt")
    gen.add_argument("--verifier-token-file", metavar="FILE", help="file holding the bearer token for --verifier")
    _model_args(gen)
    _retriever_security_args(gen)
    gen.set_defaults(run=_generate)

    demo = subparsers.add_parser("demo", help="end-to-end demo on CPU: index, retriever, verifier, with/without drafting")
    _model_args(demo)
    demo.add_argument("--index-dir", type=Path, help="stdlib datastore (built if missing)")
    demo.add_argument("--out", type=Path, default=Path("out/demo.png"), help="chart (PNG)")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--tenant", help="drafting tenant (default: a fresh one per run; reuse one to see prior "
                                       "outputs of earlier runs drafted from)")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from verifier.demo import run_demo

    return run_demo(args, _settings(args, host="127.0.0.1", port=0, http_port=-1, **_IN_PROCESS))


def _serve(args: argparse.Namespace) -> int:
    from specdraft.logs import configure_logging, log_format
    from verifier.server import serve

    try:
        fmt = log_format(args.log_format)
        settings = _settings(args, host=args.host, port=args.port, http_port=args.http_port,
                             served_model_name=args.served_model_name, retriever=args.retriever,
                             metrics_port=args.metrics_port, auth_tokens_file=args.auth_tokens,
                             tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)
    except ValueError as e:
        print(f"specdraft verifier serve: error: {e}", file=sys.stderr)
        return 2
    configure_logging(fmt)
    try:
        return serve(settings)
    except (ValueError, OSError) as e:  # a bad tokens / PEM file, a port in use
        print(f"specdraft verifier serve: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


# ---------------------------------------------------------------- generate


def _requests(args: argparse.Namespace) -> list[tuple[str, object]]:
    from protos.specdraft.v1 import verifier_pb2 as pb

    items: list[tuple[str, dict]] = [(f"arg{i}", {"messages": [{"role": "user", "content": p}]} if args.chat
                                      else {"prompt": p}) for i, p in enumerate(args.prompts)]
    if args.jsonl:
        for n, line in enumerate(args.jsonl.read_text().splitlines()):
            if line.strip():
                obj = json.loads(line)
                items.append((str(obj.get("id", f"line{n + 1}")), obj))
    out = []
    for name, obj in items:
        sampling = pb.SamplingParams(temperature=args.temperature, top_k=args.top_k, stop=args.stop,
                                     max_new_tokens=int(obj.get("max_new_tokens", args.max_new_tokens)))
        if args.top_p is not None:
            sampling.top_p = args.top_p
        if args.seed is not None:
            sampling.seed = args.seed
        req = pb.GenerateRequest(sampling=sampling, tenant=args.tenant, no_draft=args.no_draft)
        if "messages" in obj:
            req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in obj["messages"])
        elif "prompt_ids" in obj:
            req.token_ids.ids.extend(int(t) for t in obj["prompt_ids"])
        elif "prompt" in obj:
            req.text = obj["prompt"]
        else:
            raise SystemExit(f"error: prompt {name} must have 'prompt', 'messages' or 'prompt_ids', got {sorted(obj)}")
        out.append((name, req))
    if not out:
        raise SystemExit("error: prompts must be given as arguments or with --jsonl, got none")
    return out


def _format_stats(g: Generation) -> str:
    s = g.stats
    return (f"{s.new_tokens} tokens in {s.steps} steps (MAT {s.mean_accepted_tokens:.2f}), "
            f"{s.tokens_per_s:.1f} tok/s, draft {s.draft_s * 1e3:.0f} ms, verify {s.verify_s * 1e3:.0f} ms, "
            f"accepted by source {s.accepted_by_source}, finish: {g.finish_reason}")


def _generate(args: argparse.Namespace) -> int:
    requests = _requests(args)
    with _verifier_target(args) as stub:
        for name, request in requests:
            echo = None if args.json else (lambda text: print(text, end="", flush=True))
            g = generate(stub, request, on_text=echo)
            if args.json:
                print(json.dumps({"id": name, "text": g.text, "finish_reason": g.finish_reason, "stats": g.stats.to_dict()}),
                      flush=True)
            else:
                print(flush=True)
                print(f"[{name}] {_format_stats(g)}", file=sys.stderr, flush=True)
    return 0


@contextlib.contextmanager
def _verifier_target(args: argparse.Namespace) -> Iterator[object]:
    with contextlib.ExitStack() as stack:
        target = args.verifier
        if not target:
            retriever = args.retriever
            if not retriever and args.index and not args.no_draft:
                retriever = stack.enter_context(in_process_retriever([Path(p) for p in args.index]))
            settings = _settings(args, host="127.0.0.1", port=0, http_port=-1, retriever=retriever or "",
                                 **_IN_PROCESS)
            target = stack.enter_context(in_process_verifier(settings))
        elif args.verifier_token_file:
            yield _authenticated_stub(stack, target, args.verifier_token_file)
            return
        yield stack.enter_context(verifier_stub(target))


def _authenticated_stub(stack: contextlib.ExitStack, target: str, token_file: str) -> object:
    """A `VerifierStub` to `target` whose calls carry the token in `token_file` (plaintext channel)."""
    from protos.specdraft.v1 import verifier_pb2_grpc
    from retriever.channel import ChannelSecurity, open_channel, read_token_file

    token = read_token_file(token_file, "--verifier-token-file")
    channel = stack.enter_context(open_channel(target, ChannelSecurity(token=token)))
    return verifier_pb2_grpc.VerifierStub(channel)
