"""`specdraft retriever serve`: the retriever gRPC service (flags > SPECDRAFT_* > defaults)."""

from __future__ import annotations

import argparse
import asyncio
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    retriever = subparsers.add_parser("retriever", help="the retriever service (drafts from suffix indexes)")
    rsub = retriever.add_subparsers(dest="retriever_command", required=True)
    serve = rsub.add_parser("serve", help="serve specdraft.v1.Retriever over gRPC until SIGINT/SIGTERM")
    serve.add_argument("--port", type=int, help="port (0: a free one; default 50051, SPECDRAFT_PORT)")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0, SPECDRAFT_HOST)")
    serve.add_argument("--index", action="append", metavar="DIR",
                       help="corpus datastore or FAISS store directory, repeatable (replaces SPECDRAFT_INDEX_DIRS)")
    serve.add_argument("--max-nodes", type=int, metavar="N", help="default and cap of a draft's max_nodes")
    serve.add_argument("--tokenizer", metavar="PATH", help="tokenizer dir or tokenizer.json the indexes must match")
    serve.add_argument("--reflection", action="store_true", default=None, help="enable gRPC server reflection")
    serve.add_argument("--reference-set", action="store_true", default=None,
                       help="draft from a per-session reference set: similar prior outputs and the passages of "
                            "FAISS stores (SPECDRAFT_REFERENCE_SET)")
    serve.add_argument("--redis-url", metavar="URL",
                       help="shared output log in Redis: redis://, rediss:// or unix:// (SPECDRAFT_REDIS_URL; "
                            "default: the file log under --data-dir)")
    serve.add_argument("--data-dir", metavar="DIR", help="the file output log's directory parent (default data, "
                                                         "SPECDRAFT_DATA_DIR)")
    serve.add_argument("--output-log", choices=("auto", "redis", "file", "off"),
                       help="where finished outputs are shared (default auto: Redis if a URL is set, else the file)")
    serve.add_argument("--metrics-port", type=int, metavar="P",
                       help="Prometheus /metrics port (SPECDRAFT_METRICS_PORT; 0: a free one; default -1: off)")
    serve.add_argument("--auth-tokens", metavar="FILE",
                       help="bearer tokens bound to tenants, lines 'TOKEN TENANTS [admin]' or JSON "
                            "(SPECDRAFT_AUTH_TOKENS_FILE; default: no auth, see SECURITY.md)")
    serve.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (SPECDRAFT_TLS_CERT; with --tls-key)")
    serve.add_argument("--tls-key", metavar="PEM", help="TLS private key (SPECDRAFT_TLS_KEY)")
    serve.add_argument("--tls-client-ca", metavar="PEM",
                       help="require client certificates signed by this CA: mTLS (SPECDRAFT_TLS_CLIENT_CA)")
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="log lines as text or one JSON object each (SPECDRAFT_LOG_FORMAT; default text)")
    serve.set_defaults(run=run_serve)


def settings_from_args(args: argparse.Namespace):
    """RetrieverSettings from the environment with the given flags on top (ValueError when invalid)."""
    from retriever.service.settings import RetrieverSettings

    return RetrieverSettings.from_env(
        host=args.host, port=args.port, indexes=tuple(args.index) if args.index else None,
        default_max_nodes=args.max_nodes, max_nodes_cap=args.max_nodes, tokenizer=args.tokenizer,
        reflection=args.reflection, reference_set=args.reference_set, redis_url=args.redis_url,
        data_dir=args.data_dir, output_log=args.output_log, metrics_port=args.metrics_port,
        auth_tokens_file=args.auth_tokens, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, log_format=args.log_format)


def run_serve(args: argparse.Namespace) -> int:
    """Serves until SIGINT/SIGTERM; 2 on bad settings, 1 when binding or loading the indexes fails."""
    from retriever.logs import configure_logging
    from retriever.service.event_loop import loop_kind, new_event_loop

    try:
        settings = settings_from_args(args)
        loop_kind(settings.event_loop)
    except ValueError as e:
        print(f"specdraft retriever serve: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    from retriever.service.server import serve

    try:
        with asyncio.Runner(loop_factory=lambda: new_event_loop(settings.event_loop)) as runner:
            return runner.run(serve(settings))
    except OSError as e:
        print(f"specdraft retriever serve: error: {e}", file=sys.stderr)
        return 1
