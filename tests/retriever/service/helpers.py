"""Shared parts of the retriever service tests: a toy tokenizer and corpus (`data`, a module
fixture), settings, a `Running` server, a started server (`srv`, `stub` fixtures), request and
status helpers, and the CLI server (`start_cli`, `cli_server`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever.service.server import create_server
from retriever.service.settings import RetrieverSettings

VOCAB = 1000
PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]  # period 5: the context source continues it
CORPUS_RUN = [300, 301, 302, 303, 304, 305, 306]  # only in the corpus
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
ROOT = Path(__file__).resolve().parents[3]


def make_tokenizer(path: Path, vocab: int) -> Path:
    """A real word-level tokenizer.json with `vocab` ids (its bytes, hence sha256, depend on vocab)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path.mkdir(parents=True, exist_ok=True)
    Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")).save(str(path / "tokenizer.json"))
    return path


def loopback_settings(**changes) -> RetrieverSettings:
    """A tested retriever's settings: 127.0.0.1, a free port, no queue-wait shedding (max_queue_wait_ms 0:
    a loaded CI host delays a read past the 5 ms default and the server refuses the request, which looks
    like a drafting bug; only the queue-wait tests turn it on), then `changes`."""
    return RetrieverSettings(**{"host": "127.0.0.1", "port": 0, "max_queue_wait_ms": 0, **changes})


def settings(**changes) -> RetrieverSettings:
    base = dict(output_log="off", default_max_nodes=8, max_nodes_cap=16, max_new_tokens=64, max_context_tokens=4096,
                max_batch=4)
    return loopback_settings(**{**base, **changes})


class Running:
    """A started server, a channel and the stubs; `close()` stops both."""

    def __init__(self, s: RetrieverSettings, **kwargs) -> None:
        self.settings = s
        self.server, self.port = create_server(s, **kwargs)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RetrieverStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def health_of(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.channel.close()
        assert self.server.stop(0).wait(10)


def req(tenant="t", session_id="s", prompt=(), new_tokens=(), max_nodes=0) -> pb.DraftRequest:
    return pb.DraftRequest(tenant=tenant, session_id=session_id, prompt=list(prompt), new_tokens=list(new_tokens),
                           max_nodes=max_nodes)


def error_of(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, details: str) -> None:
    assert (error.code(), error.details()) == (code, details)


def best_path(tree: pb.DraftTree) -> list[int]:
    """Tokens of the chain through the first child of each node, from the root."""
    path, parent = [], -1
    for i, (token, p) in enumerate(zip(tree.token_ids, tree.parents)):
        if p == parent:
            path.append(token)
            parent = i
    return path


def start_cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "specdraft.cli", "retriever", "serve", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


@contextlib.contextmanager
def cli_server(*args: str, **env: str) -> Iterator[subprocess.Popen]:
    """`start_cli`, killed (if still running) and its pipes closed on exit."""
    proc = start_cli(*args, **env)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
