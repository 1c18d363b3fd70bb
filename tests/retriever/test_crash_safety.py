"""Crash safety (issue 6): a retriever killed with SIGKILL while it writes outputs to the file log
(SQLite WAL) or to Redis leaves only whole entries (each exactly one session's output, none
twice), and a restart on the same log replays it and serves; an index build killed with SIGKILL
leaves no index (or the complete old one) at its output path, and a rerun succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from specdraft.bench.server import ServerProcess
from tests.redis_fixtures import redis_server  # noqa: F401 - fixture
from tests.retriever.service.test_shutdown import Caller, logged_outputs, output_of


def write_then_kill(server: ServerProcess, seconds: float = 1.0) -> set[tuple[int, ...]]:
    """Sessions ended by two callers for `seconds`, then SIGKILL; the outputs that may be logged."""
    callers = [Caller(server.target, f"c{k}") for k in range(2)]
    for c in callers:
        c.start()
    time.sleep(seconds)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    for c in callers:
        c.join(10)
        assert len(c.ended) > 5
    # a session whose EndSession was in flight at the kill may or may not be logged
    return {tuple(output_of(f"{c.name}-{i}")) for c in callers for i in range(len(c.ended) + 1)}


def check_whole(logged: list[list[int]], possible: set[tuple[int, ...]]) -> None:
    entries = [tuple(e) for e in logged]
    assert entries and len(set(entries)) == len(entries)  # none twice
    assert set(entries) <= possible  # none torn: each one session's whole output


def test_file_log_survives_sigkill_during_writes(tmp_path):
    args = ("--output-log", "file", "--data-dir", str(tmp_path))
    possible = write_then_kill(ServerProcess({}, args))
    check_whole(logged_outputs(tmp_path), possible)
    again = ServerProcess({}, args)  # health SERVING only once the log is replayed
    try:
        assert again.sessions() == 0
    finally:
        assert again.stop() == 0
    check_whole(logged_outputs(tmp_path), possible)


def test_redis_log_survives_sigkill_during_writes(redis_server):  # noqa: F811
    import redis

    args = ("--output-log", "redis", "--redis-url", redis_server.url)
    possible = write_then_kill(ServerProcess({}, args))
    with redis.Redis.from_url(redis_server.url) as r:
        entries = [np.frombuffer(f[b"t"], "<i4").tolist() for _, f in r.xrange("specdraft:{t}:outputs")]
    check_whole(entries, possible)
    again = ServerProcess({}, args)
    assert again.stop() == 0


BUILD = """
import sys, numpy as np
from retriever.store.datastore import write_datastore
from retriever.store.manifest import TokenizerInfo
docs = [np.random.default_rng(i).integers(0, 1000, 200_000).astype(np.int32) for i in range(15)]
print("building", flush=True)
write_datastore(sys.argv[1], docs, TokenizerInfo("toy", "0" * 64, 1000), "crash", overwrite=True)
"""


def test_index_build_killed_at_any_point_leaves_no_half_built_index(tmp_path):
    from retriever.errors import IndexFormatError
    from retriever.store.datastore import open_datastore

    out = tmp_path / "index"
    for delay in (0.2, 0.6, 1.0):
        proc = subprocess.Popen([sys.executable, "-c", BUILD, str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "building\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        if out.exists():  # a complete index (from this or an earlier run), never a half-built one
            assert open_datastore(out).manifest.num_tokens == 15 * 200_000
        for staging in tmp_path.glob(".index.tmp-*"):  # what a kill leaves: never at the index path
            with pytest.raises(IndexFormatError):
                open_datastore(staging)
    done = subprocess.run([sys.executable, "-c", BUILD, str(out)], capture_output=True, timeout=120)
    assert done.returncode == 0 and open_datastore(out).manifest.num_tokens == 15 * 200_000
    assert not list(tmp_path.glob(".index.*-*"))  # the rerun cleaned up after the killed builds


def test_a_build_killed_between_its_renames_gets_the_old_index_back(tmp_path):
    """`.OUT.old-PID` of a dead process with OUT missing is put back; a live process's staging
    directory is left alone; a dead one's is removed."""
    from retriever.store.datastore import recover_killed_builds

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "index"
    old, stale, live = (tmp_path / f".index.old-{dead.pid}", tmp_path / f".index.tmp-{dead.pid}",
                        tmp_path / f".index.tmp-{os.getppid()}")
    for d in (old, stale, live):
        d.mkdir()
    (old / "manifest.json").write_text("{}")
    assert recover_killed_builds(out) == [old, stale]
    assert (out / "manifest.json").read_text() == "{}" and live.is_dir() and not old.exists() and not stale.exists()
    odd = tmp_path / f".idx[1].tmp-{dead.pid}"  # glob characters in the index name match literally
    odd.mkdir()
    assert recover_killed_builds(tmp_path / "idx[1]") == [odd] and not odd.exists()


@pytest.mark.parametrize("store", ["file", "redis"])
def test_a_durable_end_session_output_survives_a_kill_9_right_after_ok(tmp_path, store, request):
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
    from tests.retriever.service.test_shutdown import PROMPT

    if store == "file":
        args = ("--output-log", "file", "--data-dir", str(tmp_path))
    else:
        args = ("--output-log", "redis", "--redis-url", request.getfixturevalue("redis_server").url)
    acknowledged = []
    for life in range(3):  # each life: sessions, then SIGKILL right after the last EndSession's OK
        server = ServerProcess({"SPECDRAFT_DURABLE_END_SESSION": "1"}, args)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RetrieverStub(channel)
            for i in range(3):
                sid = f"durable-{life}-{i}"
                stub.Draft(pb.DraftRequest(tenant="t", session_id=sid, prompt=PROMPT), timeout=5)
                stub.Draft(pb.DraftRequest(tenant="t", session_id=sid, new_tokens=output_of(sid)), timeout=5)
                stub.EndSession(pb.EndSessionRequest(tenant="t", session_id=sid), timeout=5)
                acknowledged.append(tuple(output_of(sid)))
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(10)
    if store == "file":
        logged = {tuple(e) for e in logged_outputs(tmp_path)}
    else:
        import redis

        with redis.Redis.from_url(request.getfixturevalue("redis_server").url) as r:
            logged = {tuple(np.frombuffer(f[b"t"], "<i4").tolist()) for _, f in r.xrange("specdraft:{t}:outputs")}
    assert set(acknowledged) <= logged, f"{len(set(acknowledged) - logged)} acknowledged outputs lost"
