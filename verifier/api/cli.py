"""`specdraft verifier serve`: the gRPC verifier and its OpenAI-compatible HTTP API (`--http-port`,
-1: off). Settings: flags > SPECDRAFT_VERIFIER_* > defaults; the API key only from
SPECDRAFT_VERIFIER_API_KEY; secrets only in files: `--auth-tokens`, `--retriever-token-file`; see
SECURITY.md. `model_args`, `retriever_security_args` and `settings_from_args` also serve the
commands that run a verifier in-process (`specdraft generate`, `specdraft demo`).
"""

from __future__ import annotations

import argparse
import sys

from verifier.api.settings import VerifierSettings


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model id, local directory, GGUF file or 'smollm2' (default)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--backend", choices=("auto", "hf", "llama.cpp"),
                   help="the engine running the model: hf (transformers), llama.cpp (a GGUF file as it is, CPU), "
                        "auto (default): llama.cpp for a .gguf file on the CPU, else hf")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default 0: every core)")
    p.add_argument("--static-cache", choices=("auto", "on", "off"),
                   help="HF backend over a static KV cache: auto (default): on for cuda unless --no-graphs; on: "
                        "also on a CPU (eager); off: the eager dynamic cache (SPECDRAFT_VERIFIER_STATIC_CACHE)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", default=None,
                   help="no CUDA graphs: with --static-cache auto, the eager dynamic-cache fallback "
                        "(SPECDRAFT_VERIFIER_GRAPHS=0)")
    p.add_argument("--cache-dir", help="where converted models are cached (default <repo>/.cache/models)")
    p.add_argument("--max-nodes", type=int, help="draft nodes asked per step (default 64)")
    p.add_argument("--draft-deadline-ms", type=float, help="per-draft deadline (default 50)")


IN_PROCESS = dict(auth_tokens_file="", tls_cert="", tls_key="", tls_client_ca="")  # a loopback verifier of this CLI


def retriever_security_args(p: argparse.ArgumentParser) -> None:
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


def settings_from_args(args: argparse.Namespace, **overrides: object) -> VerifierSettings:
    deadline = getattr(args, "draft_deadline_ms", None)
    security = {name: getattr(args, name, None) for name in (
        "retriever_token_file", "retriever_ca", "retriever_tls", "retriever_client_cert", "retriever_client_key",
        "retriever_server_name")}
    return VerifierSettings.from_env(
        model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir, max_nodes=args.max_nodes,
        backend=getattr(args, "backend", None), threads=getattr(args, "threads", None),
        static_cache=getattr(args, "static_cache", None), graphs=getattr(args, "graphs", None),
        draft_deadline_s=deadline / 1000 if deadline is not None else None, **security, **overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    verifier = subparsers.add_parser("verifier", help="the verifier service (target model + tree verification)")
    vsub = verifier.add_subparsers(dest="verifier_command", required=True)
    serve = vsub.add_parser("serve", help="serve specdraft.v1.Verifier over gRPC and the OpenAI API over HTTP")
    model_args(serve)
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
    retriever_security_args(serve)
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from retriever.logs import configure_logging
    from verifier.api.server import serve

    try:
        settings = settings_from_args(args, host=args.host, port=args.port, http_port=args.http_port,
                                      served_model_name=args.served_model_name, retriever=args.retriever,
                                      metrics_port=args.metrics_port, auth_tokens_file=args.auth_tokens,
                                      tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                      log_format=args.log_format)
    except ValueError as e:
        print(f"specdraft verifier serve: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    try:
        return serve(settings)
    except (ValueError, OSError) as e:  # a bad tokens / PEM file, a port in use
        print(f"specdraft verifier serve: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
