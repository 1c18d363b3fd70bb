"""The validation table: every bad input of every RPC and CLI command, one row each.

RPC rows run against a real server (`create_server`) over a real corpus datastore (the
fixtures of tests/retriever/service/test_servicer.py) and must: get exactly their status code and message
("X must be Y, got Z"; grpc's own for a message over the receive limit), within 0.5 s
(a hang catcher, not a benchmark), leave no state behind (the drafter's gauges on /metrics
unchanged, the sessions they name absent, the sessions set up before them unchanged), be
counted as one rejection, and the next valid call succeeds. Malformed UTF-8 and corrupt wire
bytes cannot be built with the proto API: those rows send hand-encoded bytes.
CLI rows run `specdraft index ...` through `main(argv)` and `specdraft retriever serve` as a
process: a non-zero exit and one precise "error" line, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever.service.server import MAX_MESSAGE_BYTES
from retriever.service.wire import varint
from specdraft.cli import main
from tests.retriever.service.helpers import PROMPT, ROOT, VOCAB, Running, req, settings

IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
CAP, MAX_NEW, MAX_CTX, MAX_BATCH = 16, 64, 4096, 4  # tests.retriever.service.test_servicer.settings()
BOUND_S = 0.5
GAUGES = ("sessions", "tenants", "tenant_tokens", "online_index_bytes")


# ---------------------------------------------------------------- hand-encoded wire bytes


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message, packed repeated)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def raw_draft(tenant: bytes = b"t", session_id: bytes = b"s", prompt: bytes = b"\x01\x02") -> bytes:
    """A DraftRequest with the given raw tenant and session_id bytes and packed prompt varints."""
    return ld(1, tenant) + ld(2, session_id) + ld(3, prompt)


BAD_UTF8 = b"\xff\xfe"
CORRUPT = b"\x1a\xff\xff"  # field 3, a length varint that never ends


def oversized_draft() -> bytes:
    """A DraftRequest 4 bytes over the server's receive limit."""
    n = MAX_MESSAGE_BYTES - 8 + 1
    return b"\x0a\x01t\x12\x01s\x1a" + varint(n) + b"\x01" * n


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    """One bad input: `request` is a message, raw bytes, or (DraftStream) a list of either."""

    id: str
    rpc: str
    request: Any
    code: grpc.StatusCode
    message: str  # the exact details (with `fragment`: a part of them)
    setup: tuple[tuple[str, str, int], ...] = ()  # sessions (tenant, session_id, prompt length) started first
    absent: tuple[tuple[str, str], ...] = ()  # sessions that must not exist afterwards
    fragment: bool = False
    counted: bool = True  # a rejection in the retriever's metrics (grpc's own limits are not)
    bound_s: float = BOUND_S


def ids_msg(what: str, i: int, got: int) -> str:
    return f"{what}[{i}] must be a token id in [0, {VOCAB}), got {got}"


def unknown(session: str) -> str:
    return f"session must be started with a prompt first, got new_tokens for unknown session {session!r}"


def ended(session: str) -> str:
    return f"session must exist to be ended, got unknown session {session!r}"


def undecodable(message: str, size: int, reason: str = "String field had bad UTF-8") -> str:
    return f"request must be a valid specdraft.v1.{message}, got {size} bytes that do not parse ({reason})"


def batch(*requests) -> pb.DraftBatchRequest:
    return pb.DraftBatchRequest(requests=list(requests))


def end(tenant: str = "t", session_id: str = "s", new_tokens: tuple[int, ...] = ()) -> pb.EndSessionRequest:
    return pb.EndSessionRequest(tenant=tenant, session_id=session_id, new_tokens=list(new_tokens))


T_S = (("t", "s"),)
ROWS = [
    # Draft: empty, names, counts, ids, budgets, unknown sessions, bytes
    Row("draft-empty", "Draft", pb.DraftRequest(), IA, "tenant must be non-empty, got ''"),
    Row("draft-no-session", "Draft", req(session_id="", prompt=[1]), IA, "session_id must be non-empty, got ''"),
    Row("draft-no-tokens", "Draft", req(), IA, "prompt or new_tokens must be non-empty, got neither", absent=T_S),
    Row("draft-long-tenant", "Draft", req(tenant="x" * 129, prompt=[1]), IA,
        "tenant must be at most 128 bytes of UTF-8, got 129 bytes"),
    Row("draft-long-session-utf8", "Draft", req(session_id="é" * 65, prompt=[1]), IA,
        "session_id must be at most 128 bytes of UTF-8, got 130 bytes"),
    Row("draft-prompt-count", "Draft", req(prompt=[1] * (MAX_CTX + 1)), IA,
        f"prompt must be at most {MAX_CTX} tokens, got {MAX_CTX + 1}", absent=T_S),
    Row("draft-new-count", "Draft", req(prompt=[1], new_tokens=[1] * (MAX_NEW + 1)), IA,
        f"new_tokens must be at most {MAX_NEW} tokens, got {MAX_NEW + 1}", absent=T_S),
    Row("draft-negative-id", "Draft", req(prompt=[1, 2, -1]), IA, ids_msg("prompt", 2, -1), absent=T_S),
    Row("draft-int32-min", "Draft", req(prompt=[-2**31]), IA, ids_msg("prompt", 0, -2**31), absent=T_S),
    Row("draft-out-of-vocab", "Draft", req(prompt=[VOCAB]), IA, ids_msg("prompt", 0, VOCAB), absent=T_S),
    Row("draft-huge-new-id", "Draft", req(prompt=[1], new_tokens=[3, 2**31 - 1]), IA,
        ids_msg("new_tokens", 1, 2**31 - 1), absent=T_S),
    Row("draft-bad-id-existing", "Draft", req(session_id="live", new_tokens=[VOCAB + 1]), IA,
        ids_msg("new_tokens", 0, VOCAB + 1), setup=(("t", "live", 12),)),
    Row("draft-max-nodes-over-cap", "Draft", req(prompt=[1], max_nodes=CAP + 1), IA,
        f"max_nodes must be at most {CAP}, got {CAP + 1}", absent=T_S),
    Row("draft-max-nodes-uint32-max", "Draft", req(prompt=[1], max_nodes=2**32 - 1), IA,
        f"max_nodes must be at most {CAP}, got {2**32 - 1}", absent=T_S),
    Row("draft-unknown-session", "Draft", req(session_id="ghost", new_tokens=[7]), NF, unknown("ghost"),
        absent=(("t", "ghost"),)),
    Row("draft-unknown-tenant", "Draft", req(tenant="u", session_id="mine", new_tokens=[7]), NF, unknown("mine"),
        setup=(("t", "mine", 12),), absent=(("u", "mine"),)),
    Row("draft-context-over-budget", "Draft", req(session_id="full", new_tokens=[1] * 7), RE,
        f"session context must be at most {MAX_CTX} tokens, got {MAX_CTX + 1}", setup=(("t", "full", MAX_CTX - 6),)),
    Row("draft-start-over-budget", "Draft", req(prompt=[1] * MAX_CTX, new_tokens=[2]), RE,
        f"session context must be at most {MAX_CTX} tokens, got {MAX_CTX + 1}", absent=T_S),
    Row("draft-prediction-without-prompt", "Draft",
        pb.DraftRequest(tenant="t", session_id="live", new_tokens=[1], prediction=[1, 2]), IA,
        "prediction must come with a prompt (a session's first call), got 2 prediction tokens without one",
        setup=(("t", "live", 12),)),
    Row("draft-prediction-out-of-vocab", "Draft", pb.DraftRequest(tenant="t", session_id="s", prompt=[1],
        prediction=[3, VOCAB]), IA, ids_msg("prediction", 1, VOCAB), absent=T_S),
    Row("draft-prediction-count", "Draft", pb.DraftRequest(tenant="t", session_id="s", prompt=[1],
        prediction=[1] * (MAX_CTX + 1)), IA, f"prediction must be at most {MAX_CTX} tokens, got {MAX_CTX + 1}",
        absent=T_S),
    Row("draft-bad-utf8-tenant", "Draft", raw_draft(tenant=BAD_UTF8), IA, undecodable("DraftRequest", 11)),
    Row("draft-bad-utf8-session", "Draft", raw_draft(session_id=b"s\xc3"), IA, undecodable("DraftRequest", 11)),
    Row("draft-corrupt-wire", "Draft", CORRUPT, IA, undecodable("DraftRequest", 3, "Wire format was corrupt")),
    Row("draft-oversized-bytes", "Draft", oversized_draft(), RE,
        f"Received message larger than max ({MAX_MESSAGE_BYTES + 4} vs. {MAX_MESSAGE_BYTES})", fragment=True,
        counted=False, bound_s=5.0),  # 64 MiB over loopback first
    # DraftStream: the first message bad (the stream ends with its status)
    Row("stream-negative-id", "DraftStream", [req(prompt=[5, -7])], IA, ids_msg("prompt", 1, -7), absent=T_S),
    Row("stream-max-nodes-over-cap", "DraftStream", [req(prompt=[5], max_nodes=999)], IA,
        f"max_nodes must be at most {CAP}, got 999", absent=T_S),
    Row("stream-unknown-session", "DraftStream", [req(session_id="ghost", new_tokens=[1])], NF, unknown("ghost")),
    Row("stream-empty-message", "DraftStream", [pb.DraftRequest()], IA, "tenant must be non-empty, got ''"),
    Row("stream-bad-utf8", "DraftStream", [raw_draft(tenant=BAD_UTF8)], IA, undecodable("DraftRequest", 11)),
    Row("stream-oversized-bytes", "DraftStream", [oversized_draft()], RE,
        f"Received message larger than max ({MAX_MESSAGE_BYTES + 4} vs. {MAX_MESSAGE_BYTES})",
        fragment=True, counted=False, bound_s=5.0),
    # DraftBatch: whole-call failures, and single items failing (the item's error)
    Row("batch-empty", "DraftBatch", batch(), IA, f"requests must hold 1 to {MAX_BATCH} drafts, got 0"),
    Row("batch-too-many", "DraftBatch", batch(*[req(session_id=f"z{i}", prompt=[1]) for i in range(MAX_BATCH + 1)]),
        IA, f"requests must hold 1 to {MAX_BATCH} drafts, got {MAX_BATCH + 1}", absent=(("t", "z0"), ("t", "z4"))),
    Row("batch-item-out-of-vocab", "DraftBatch", batch(req(prompt=[1, VOCAB])), IA, ids_msg("prompt", 1, VOCAB),
        absent=T_S),
    Row("batch-item-empty", "DraftBatch", batch(pb.DraftRequest()), IA, "tenant must be non-empty, got ''"),
    Row("batch-item-over-cap", "DraftBatch", batch(req(prompt=[1], max_nodes=CAP + 1)), IA,
        f"max_nodes must be at most {CAP}, got {CAP + 1}", absent=T_S),
    Row("batch-item-unknown-session", "DraftBatch", batch(req(session_id="ghost", new_tokens=[2])), NF,
        unknown("ghost")),
    Row("batch-item-over-budget", "DraftBatch", batch(req(session_id="full", new_tokens=[3] * 7)), RE,
        f"session context must be at most {MAX_CTX} tokens, got {MAX_CTX + 1}", setup=(("t", "full", MAX_CTX - 6),)),
    Row("batch-bad-utf8", "DraftBatch", ld(1, raw_draft(session_id=BAD_UTF8)), IA,
        undecodable("DraftBatchRequest", 13)),
    # EndSession
    Row("end-empty", "EndSession", pb.EndSessionRequest(), IA, "tenant must be non-empty, got ''"),
    Row("end-no-session", "EndSession", end(session_id=""), IA, "session_id must be non-empty, got ''"),
    Row("end-long-tenant", "EndSession", end(tenant="é" * 100), IA,
        "tenant must be at most 128 bytes of UTF-8, got 200 bytes"),
    Row("end-unknown-session", "EndSession", end(session_id="ghost"), NF, ended("ghost")),
    Row("end-unknown-tenant", "EndSession", end(tenant="u", session_id="mine"), NF, ended("mine"),
        setup=(("t", "mine", 12),)),
    Row("end-new-negative", "EndSession", end(session_id="open", new_tokens=(3, -2)), IA, ids_msg("new_tokens", 1, -2),
        setup=(("t", "open", 12),)),
    Row("end-new-out-of-vocab", "EndSession", end(session_id="open", new_tokens=(VOCAB,)), IA,
        ids_msg("new_tokens", 0, VOCAB), setup=(("t", "open", 12),)),
    Row("end-new-count", "EndSession", end(session_id="open", new_tokens=(1,) * (MAX_NEW + 1)), IA,
        f"new_tokens must be at most {MAX_NEW} tokens, got {MAX_NEW + 1}", setup=(("t", "open", 12),)),
    Row("end-new-over-budget", "EndSession", end(session_id="full", new_tokens=(3,) * 7), RE,
        f"session context must be at most {MAX_CTX} tokens, got {MAX_CTX + 1}", setup=(("t", "full", MAX_CTX - 6),)),
    Row("end-bad-utf8", "EndSession", ld(1, BAD_UTF8) + ld(2, b"s"), IA, undecodable("EndSessionRequest", 7)),
    # Describe takes no input: only corrupt bytes can be wrong (unknown fields are ignored, as proto3 says)
    Row("describe-corrupt-wire", "Describe", CORRUPT, IA, undecodable("DescribeRequest", 3, "Wire format was corrupt")),
]
SERDE = {"Draft": (pb.DraftRequest, pb.DraftResponse), "DraftStream": (pb.DraftRequest, pb.DraftResponse),
         "DraftBatch": (pb.DraftBatchRequest, pb.DraftBatchResponse),
         "EndSession": (pb.EndSessionRequest, pb.EndSessionResponse), "Describe": (pb.DescribeRequest,
                                                                                   pb.DescribeResponse)}


def wire(request: Any) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def call(channel: grpc.Channel, row: Row) -> tuple[grpc.StatusCode, str]:
    """The row's call: its status code and details (a one-item DraftBatch: the item's error)."""
    method = f"/specdraft.v1.Retriever/{row.rpc}"
    try:
        if row.rpc == "DraftStream":
            stream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
            answers = list(stream(iter([wire(r) for r in row.request]), timeout=10))
            return grpc.StatusCode.OK, f"{len(answers)} responses"
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)(wire(row.request),
                                                                                              timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details()
    if row.rpc == "DraftBatch":
        items = pb.DraftBatchResponse.FromString(raw).responses
        if len(items) == 1 and items[0].HasField("error"):
            code = next(c for c in grpc.StatusCode if c.value[0] == items[0].error.code)
            return code, items[0].error.message
    return grpc.StatusCode.OK, "answered"


class Table:
    """The module's server, a channel that may send anything, and its /metrics."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}",
                                             options=[("grpc.max_send_message_length", -1)])
        self.stub = running.stub

    def metrics(self) -> dict[str, float]:
        """The drafter's gauges and the total of rejections, scraped from /metrics."""
        url = f"http://127.0.0.1:{self.running.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out = {"rejections": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name = s.name.removeprefix("specdraft_retriever_")
                if name in GAUGES:
                    out[name] = s.value
                elif name == "rejections_total":
                    out["rejections"] += s.value
        return out

    def start(self, tenant: str, session_id: str, length: int) -> None:
        prompt = (PROMPT * (length // len(PROMPT) + 1))[:length]
        assert self.stub.Draft(req(tenant, session_id, prompt=prompt), timeout=5).context_tokens == length


@pytest.fixture(scope="module")
def table(data):
    corpus, toy, _ = data
    running = Running(settings(indexes=(str(corpus),), tokenizer=str(toy), metrics_port=0))
    assert running.server.wait_ready(30)
    yield Table(running)
    running.close()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_precisely_quickly_and_leaves_no_state(table, row):
    for tenant, session_id, length in row.setup:
        table.start(tenant, session_id, length)
    before = table.metrics()
    t0 = time.perf_counter()
    code, details = call(table.channel, row)
    elapsed = time.perf_counter() - t0
    assert code == row.code, (code, details)
    assert row.message in details if row.fragment else details == row.message
    assert " must " in details or not row.counted  # the house style; grpc's own limits say it their way
    assert elapsed < row.bound_s, f"{row.id} took {elapsed:.3f} s"
    after = table.metrics()
    assert {k: after[k] for k in GAUGES} == {k: before[k] for k in GAUGES}  # no session, tenant or token left
    assert after["rejections"] - before["rejections"] == (1 if row.counted else 0)
    for tenant, session_id in row.absent:
        with pytest.raises(grpc.RpcError) as info:
            table.stub.Draft(req(tenant, session_id, new_tokens=[1]), timeout=5)
        assert info.value.code() == NF
    next_valid_call_succeeds(table, row)


def next_valid_call_succeeds(table: Table, row: Row) -> None:
    """The sessions set up continue where they were (then end); without any, a fresh session drafts."""
    for tenant, session_id, length in row.setup:
        r = table.stub.Draft(req(tenant, session_id, new_tokens=[7]), timeout=5)
        assert r.context_tokens == length + 1
        assert table.stub.EndSession(end(tenant, session_id), timeout=5).output_tokens == 1
    if not row.setup:
        r = table.stub.Draft(req("after", row.id, prompt=PROMPT, max_nodes=4), timeout=5)
        assert r.context_tokens == len(PROMPT) and 0 < len(r.tree.token_ids) <= 4
        assert table.stub.EndSession(end("after", row.id), timeout=5).output_tokens == 0


# ---------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class CliRow:
    """`specdraft ARGS` (paths from `cli_paths`, as {name}) must exit `code` with one error line holding `message`."""

    id: str
    args: tuple[str, ...]
    code: int
    message: str
    process: bool = False  # run as a process (serve), else through main(argv)
    env: dict[str, str] = field(default_factory=dict)


BUILD = ("index", "build", "--no-progress", "--tokenizer")
SERVE = ("retriever", "serve", "--host", "127.0.0.1", "--port", "0", "--output-log", "off")
CLI_ROWS = [
    CliRow("build-missing-input", (*BUILD, "{toy}", "--out", "{new}", "{missing}"), 2,
           "error: input {missing} must be a file or directory, got no such path"),
    CliRow("build-non-utf8-input", (*BUILD, "{toy}", "--out", "{new}", "{binary}"), 2,
           "error: input file {binary} must be UTF-8, got invalid start byte at byte 0"),
    CliRow("build-tokenizer-not-json", (*BUILD, "{binary}", "--out", "{new}", "{text}"), 2,
           "error: tokenizer {binary} must be a valid tokenizer.json, got: "),
    CliRow("build-tokenizer-dir-without-one", (*BUILD, "{plain_dir}", "--out", "{new}", "{text}"), 2,
           "error: tokenizer directory {plain_dir} must contain tokenizer.json, got none"),
    CliRow("build-other-tokenizer-over-index", (*BUILD, "{other}", "--out", "{corpus}", "{text}"), 2,
           "error: output {corpus} already holds an index; pass overwrite (--overwrite) to replace it"),
    CliRow("build-over-non-index", (*BUILD, "{toy}", "--out", "{plain_dir}", "{text}"), 2,
           "error: output {plain_dir} must be a new path, an empty directory or an existing index, got another "
           "file or directory (refusing to replace it)"),
    CliRow("inspect-non-index", ("index", "inspect", "{plain_dir}"), 2,
           "error: {plain_dir}/manifest.json must exist (an interrupted build leaves none), got no such file"),
    CliRow("inspect-missing", ("index", "inspect", "{missing}"), 2,
           "error: index {missing} must be a directory, got no such path"),
    CliRow("inspect-bad-manifest", ("index", "inspect", "{bad_manifest}"), 2,
           "error: {bad_manifest}/manifest.json must be valid JSON, got "),
    CliRow("inspect-other-tokenizer", ("index", "inspect", "{corpus}", "--tokenizer", "{other}"), 2,
           "error: index {corpus} tokenizer must be other (sha256 "),
    CliRow("serve-max-nodes-zero", (*SERVE, "--max-nodes", "0"), 2,
           "specdraft retriever serve: error: SPECDRAFT_DEFAULT_MAX_NODES must be an integer >= 1, got 0", True),
    CliRow("serve-max-nodes-over-limit", (*SERVE, "--max-nodes", "5000"), 2,
           "specdraft retriever serve: error: SPECDRAFT_MAX_NODES_CAP must be an integer in [1, 4096], got 5000",
           True),
    CliRow("serve-index-of-other-tokenizer", (*SERVE, "--index", "{corpus}", "--tokenizer", "{other}"), 1,
           "retriever indexes failed to load: index {corpus} tokenizer must be other (sha256 ", True),
    CliRow("serve-non-index", (*SERVE, "--index", "{plain_dir}"), 1,
           "retriever indexes failed to load: {plain_dir}/manifest.json must exist", True),
]


@pytest.fixture(scope="module")
def cli_paths(data, tmp_path_factory) -> dict[str, str]:
    corpus, toy, other = data
    root = tmp_path_factory.mktemp("cli")
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("not an index\n")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00 not text")
    (root / "text.jsonl").write_text('{"text": "w1 w2 w3"}\n')
    (root / "badm").mkdir()
    (root / "badm" / "manifest.json").write_text("{not json")
    return {"toy": str(toy), "other": str(other), "corpus": str(corpus), "new": str(root / "new"),
            "missing": str(root / "missing.jsonl"), "binary": str(root / "binary.jsonl"),
            "text": str(root / "text.jsonl"), "plain_dir": str(root / "plain"), "bad_manifest": str(root / "badm")}


def run_cli(row: CliRow, paths: dict[str, str], capsys) -> tuple[int, str]:
    args = [a.format(**paths) for a in row.args]
    if not row.process:
        capsys.readouterr()
        code = main(args)
        return code, capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "specdraft.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **row.env})
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_bad_cli_input_exits_non_zero_with_one_precise_line(row, cli_paths, capsys):
    code, err = run_cli(row, cli_paths, capsys)
    message = row.message.format(**cli_paths)
    assert code == row.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], err
    if not row.process:
        assert err.splitlines() == errors  # nothing but the error line
    assert not os.path.exists(cli_paths["new"])  # no index was left behind, not even half of one
