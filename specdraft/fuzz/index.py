"""The index-file fuzz target of `specdraft fuzz index`.

Builds a small real index of each kind (suffix array; FAISS when faiss imports), then, in a
child process, loops: copy an index, apply one `MUTATIONS` entry, open it with the server's
loader (`retriever.store.faiss_store.open_index`, checksums on), and when it opens, draft from it.
Each try ends as one `Outcome`: "rejected" (IndexFormatError / FailedPrecondition with a
message: the contract), "loaded" (the change missed every checked byte, e.g. the manifest's
name, and drafting worked), or a failure: "missed" (a changed data file or checksum opened
anyway), "unexpected" (another exception class) or "crashed" (the child died: its last try is
reported and a new child carries on). "restamp" mutations rewrite the manifest's sizes and
checksums after corrupting a data file, as a careless tool or an attacker would: the loader's
structural checks and the C++ core must then hold on their own.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from retriever.store.manifest import MANIFEST_FILE

VOCAB = 300


@dataclass(frozen=True)
class Outcome:
    mutation: str  # e.g. "bitflip sa.u32"
    result: str  # rejected | loaded | missed | unexpected | crashed
    detail: str  # the error class and what its message names; "" when loaded

    @property
    def failed(self) -> bool:
        return self.result in ("missed", "unexpected", "crashed")


def build_bases(root: Path, seed: int) -> list[Path]:
    """Small indexes to mutate: a suffix-array datastore and, if faiss imports, a FAISS store."""
    from retriever.store.datastore import write_datastore
    from retriever.store.manifest import TokenizerInfo

    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, VOCAB, int(rng.integers(1, 120))).astype(np.int32) for _ in range(12)]
    docs.append(np.tile(np.arange(5, 12, dtype=np.int32), 6))  # a repeated run: drafts find matches
    tok = TokenizerInfo("fuzz", "ab" * 32, VOCAB)
    write_datastore(root / "sa", docs, tok, "fuzz-sa", ["fuzz"], sorted_depth=32)
    bases = [root / "sa"]
    try:
        from retriever.store.embedding import LexicalEmbedder
        from retriever.store.faiss_manifest import WindowParams
        from retriever.store.faiss_store import write_faiss_store

        write_faiss_store(root / "faiss", docs, tok, "fuzz-faiss", ["fuzz"], embedder=LexicalEmbedder(16),
                          windows=WindowParams(window=16, stride=12, continuation=8))
        bases.append(root / "faiss")
    except ImportError:
        pass
    return bases


# ---------------------------------------------------------------- mutations (dir, rng) -> name, must_reject


def _data_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name != MANIFEST_FILE)


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST_FILE).read_text())


def _write_manifest(d: Path, m: dict) -> None:
    (d / MANIFEST_FILE).write_text(json.dumps(m, indent=2))


def _flip_bits(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if not data:
        data = bytearray(b"\x00")
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _truncate(path: Path, rng: random.Random) -> None:
    size = path.stat().st_size
    os.truncate(path, rng.randrange(size) if size else 0)


def m_truncate(d: Path, rng: random.Random) -> tuple[str, bool]:
    p = rng.choice([*_data_files(d), d / MANIFEST_FILE])
    _truncate(p, rng)
    return f"truncate {p.name}", p.name != MANIFEST_FILE  # a manifest cut after its "}" still parses


def m_bitflip(d: Path, rng: random.Random) -> tuple[str, bool]:
    p = rng.choice([*_data_files(d), d / MANIFEST_FILE])
    _flip_bits(p, rng)
    return f"bitflip {p.name}", p.name != MANIFEST_FILE  # a manifest flip may hit its name: that loads


def m_version(d: Path, rng: random.Random) -> tuple[str, bool]:
    m = _manifest(d)
    m["format_version"] = rng.choice([0, 2, 99, -1, "1", 1.0, None, True])
    _write_manifest(d, m)
    return "format_version", True


def m_checksum(d: Path, rng: random.Random) -> tuple[str, bool]:
    m = _manifest(d)
    name = rng.choice(sorted(m["files"]))
    m["files"][name]["sha256"] = rng.choice(["0" * 64, "%064x" % rng.getrandbits(256), "xyz", ""])
    _write_manifest(d, m)
    return f"checksum {name}", True


def _leaves(m: dict) -> list[tuple[str, ...]]:
    """Paths of the manifest's integer and string fields, two levels deep (name and build info aside)."""
    out: list[tuple[str, ...]] = []
    for k, v in m.items():
        if isinstance(v, dict) and k != "build":
            out += [(k, k2) for k2, v2 in v.items() if isinstance(v2, (int, str, dict))]
        elif isinstance(v, (int, str)) and k not in ("name", "format_version"):
            out.append((k,))
    return out


def m_field(d: Path, rng: random.Random) -> tuple[str, bool]:
    """One field set to an edge value; only a changed format, count, size or file entry must be refused."""
    m = _manifest(d)
    path = rng.choice(_leaves(m))
    parent = m if len(path) == 1 else m[path[0]]
    old = parent[path[-1]]
    parent[path[-1]] = rng.choice([-1, 0, 1, 2**31, 2**64, "x", None, {}, old + 1 if isinstance(old, int) else "?"])
    _write_manifest(d, m)
    top = len(path) == 1 and path[0] != "sorted_depth"  # another positive depth is not checkable: it loads
    return f"field {'.'.join(path)}", top or path[0] == "files"


def m_json(d: Path, rng: random.Random) -> tuple[str, bool]:
    text = (d / MANIFEST_FILE).read_text()
    cut = rng.randrange(len(text))
    (d / MANIFEST_FILE).write_text(rng.choice([text[:cut], text[:cut] + "\x00}" + text[cut:], "[]", "null", "7"]))
    return "manifest json", True


def m_delete(d: Path, rng: random.Random) -> tuple[str, bool]:
    p = rng.choice([*_data_files(d), d / MANIFEST_FILE])
    p.unlink()
    return f"delete {p.name}", True


def m_swap(d: Path, rng: random.Random) -> tuple[str, bool]:
    a, b = rng.sample(_data_files(d), 2)
    tmp = d / "swap.tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    return f"swap {a.name} {b.name}", True


def m_restamp(d: Path, rng: random.Random) -> tuple[str, bool]:
    """Corrupts a data file, then rewrites the manifest's size and sha256 of it to match."""
    from retriever.store.datastore import file_sha256

    p = rng.choice(_data_files(d))
    how = rng.choice(["bitflip", "truncate", "zero", "random"])
    if how == "bitflip":
        _flip_bits(p, rng)
    elif how == "truncate":
        _truncate(p, rng)
    else:
        size = p.stat().st_size
        p.write_bytes(bytes(size) if how == "zero" else rng.randbytes(size))
    m = _manifest(d)
    m["files"][p.name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    _write_manifest(d, m)
    return f"restamp {how} {p.name}", False


MUTATIONS: dict[str, Callable[[Path, random.Random], tuple[str, bool]]] = {
    "truncate": m_truncate, "bitflip": m_bitflip, "version": m_version, "checksum": m_checksum, "field": m_field,
    "json": m_json, "delete": m_delete, "swap": m_swap, "restamp": m_restamp}


# ---------------------------------------------------------------- one try (in the child)


def _kind_of(error: Exception, d: Path) -> str:
    """What the message names: the text before " must ", paths shortened to file names."""
    return str(error).split(" must ", 1)[0].replace(f"{d}/", "").replace(str(d), "INDEX")[:80]


def _use(index: object, rng: random.Random) -> None:
    """Drafts from an index that opened, as the server would (FAISS stores feed reference sets)."""
    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import ALL_SOURCES, DrafterConfig
    from retriever.store.faiss_manifest import FAISS_KIND

    faiss = getattr(index, "manifest").kind == FAISS_KIND
    drafter = Drafter(DrafterConfig(sources=ALL_SOURCES), corpora=[] if faiss else [index],
                      references=[index] if faiss else [])
    contexts = [np.arange(5, 12, dtype=np.int32), np.array([rng.randrange(VOCAB) for _ in range(9)], np.int32),
                np.array([rng.randrange(1 << 24 - 1) for _ in range(3)], np.int32)]
    for i, ctx in enumerate(contexts):
        drafter.draft("fuzz", f"s{i}", ctx, np.array([5, 6], np.int32), 32)
    if faiss:
        for hits in getattr(index, "search_many")(contexts, 4):
            assert all(h.tokens.dtype == np.int32 for h in hits)


def try_one(base: Path, work: Path, rng: random.Random, announce: Callable[[str], None]) -> Outcome:
    """Copies `base` to `work`, mutates it once, opens and drafts from it; the Outcome."""
    from retriever.errors import FailedPrecondition, IndexFormatError
    from retriever.store.faiss_store import open_index

    d = work / "ix"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    name, must_reject = MUTATIONS[rng.choice(sorted(MUTATIONS))](d, rng)
    name = f"{base.name}: {name}"
    announce(name)
    try:
        index = open_index(d)
    except (IndexFormatError, FailedPrecondition) as e:
        return Outcome(name, "rejected", f"{type(e).__name__}: {_kind_of(e, d)}")
    except Exception as e:  # noqa: BLE001 - the finding
        return Outcome(name, "unexpected", f"load raised {type(e).__name__}: {str(e)[:160]}")
    try:
        _use(index, rng)
    except Exception as e:  # noqa: BLE001 - the finding
        return Outcome(name, "unexpected", f"draft raised {type(e).__name__}: {str(e)[:160]}")
    return Outcome(name, "missed" if must_reject else "loaded", "")


def worker(bases: list[str], seed: int, deadline: float, count: int) -> None:
    """The child's loop: a JSON line {"try": name} before each load, {"outcome": ...} after."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="specdraft-fuzz-") as work:
        for _ in range(count):
            if time.time() >= deadline:
                break
            outcome = try_one(Path(rng.choice(bases)), Path(work), rng,
                              lambda name: print(json.dumps({"try": name}), flush=True))
            print(json.dumps({"outcome": [outcome.mutation, outcome.result, outcome.detail]}), flush=True)


# ---------------------------------------------------------------- the parent


def fuzz_index(seconds: float, seed: int, count: int = 1 << 30) -> list[Outcome]:
    """Runs the target for `seconds` (or `count` tries) in child processes; a child's death
    is the "crashed" outcome of the try it was on, and a new child carries on."""
    outcomes: list[Outcome] = []
    deadline = time.time() + seconds
    with tempfile.TemporaryDirectory(prefix="specdraft-fuzz-bases-") as root:
        bases = [str(p) for p in build_bases(Path(root), seed)]
        round_ = 0
        while len(outcomes) < count and time.time() < deadline:
            args = json.dumps([bases, seed * 7919 + round_, deadline, count - len(outcomes)])
            outcomes += _child(args)
            round_ += 1
    return outcomes


def _child(args: str) -> list[Outcome]:
    """One child's outcomes, a crash included."""
    proc = subprocess.Popen([sys.executable, "-m", "specdraft.fuzz.index", args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out, trying = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a library's own output
        if "try" in record:
            trying = record["try"]
        elif "outcome" in record:
            out.append(Outcome(*record["outcome"]))
            trying = None
    rc = proc.wait()
    if rc != 0:
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        out.append(Outcome(trying or "(between tries)", "crashed", f"the loading process died ({how})"))
    return out


if __name__ == "__main__":
    worker(*json.loads(sys.argv[1]))
