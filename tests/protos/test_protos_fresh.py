"""The committed gRPC/protobuf stubs are what `make protos` generates from the .proto files now
(regenerated into a temp dir with the project's grpcio-tools and compared byte for byte)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = Path("protos/specdraft/v1")
PROTOS = sorted(p.relative_to(ROOT) for p in (ROOT / PROTO_DIR).glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_the_retriever_contract_is_among_the_protos():
    assert PROTO_DIR / "retriever.proto" in PROTOS


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_committed_stubs_are_fresh(proto: Path, tmp_path: Path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(proto)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    stale = []
    for suffix in SUFFIXES:
        name = proto.with_name(proto.stem + suffix)
        fresh = (tmp_path / name).read_bytes()
        committed = ROOT / name
        if not committed.exists() or committed.read_bytes() != fresh:
            stale.append(str(name))
    assert not stale, f"stubs must match {proto}, got stale {stale}: run `make protos` and commit them"
