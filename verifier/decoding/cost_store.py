"""Cost curves kept on disk, so no generation pays seconds of measurement after the first run.

One JSON file per key: the backend kind, the model file or folder (its path, size and
modification time: a changed file is a new key), the precision (dtype, device, threads) and the
CPUs this process may use. `CostStore(folder).load_or_measure(backend, max_tokens)` reads the
curve, or measures it (`CostModel.measure`) and writes it; `save(backend, cost)` writes a curve
refined by the steps that ran. A missing, unreadable or foreign file is measured again; a folder
that cannot be written is logged, never an error (the curve is an optimization).

File format, version 2: {"version": 2, "key": {...}, "tokens": [1, 2, ...], "cost_ns": [...],
"baseline_tokens": [...], "baseline_cost_ns": [...]} (the refined curve, and the measured one that
bounds its shape: `CostModel`; a file without a baseline takes its curve as the baseline). Version
2 curves may fall where a backend's kernels tile the batch (llama.cpp, timed at every size); a
version-1 file (every curve rising, llama.cpp timed at powers of two) is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from verifier.decoding.cost import CostModel

if TYPE_CHECKING:
    from verifier.decoding.backend import Backend

log = logging.getLogger(__name__)
VERSION = 2


@dataclass(frozen=True)
class CostKey:
    backend: str
    path: str
    model_bytes: int  # the model file's size (a folder: the sum of its files)
    model_mtime_ns: int  # the newest modification time among them
    precision: str
    cpus: int

    @staticmethod
    def of(backend: "Backend") -> "CostKey":
        path = Path(backend.path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
        stats = [p.stat() for p in files]
        return CostKey(backend.kind, str(path.resolve()) if files else str(path), sum(s.st_size for s in stats),
                       max((s.st_mtime_ns for s in stats), default=0), backend.precision,
                       len(os.sched_getaffinity(0)))

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"cost-v{VERSION}-{digest}.json"


class CostStore:
    """Cost curves under one folder (created on the first write)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._keys: dict[int, tuple["Backend", CostKey]] = {}  # id -> (backend, its key): stat the model once

    def _key(self, backend: "Backend") -> CostKey:
        held = self._keys.get(id(backend))
        if held is None or held[0] is not backend:
            held = self._keys[id(backend)] = (backend, CostKey.of(backend))
        return held[1]

    def load(self, backend: "Backend") -> CostModel | None:
        """The kept curve of this backend's key, or None (none, unreadable, or another key's)."""
        key = self._key(backend)
        path = self.folder / key.file_name()
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION or data.get("key") != asdict(key):
                raise ValueError(f"version and key must be {VERSION} and this model's, got {data.get('version')}")
            baseline = (tuple(data["baseline_tokens"]), tuple(data["baseline_cost_ns"])) \
                if "baseline_tokens" in data else None
            return CostModel(tuple(data["tokens"]), tuple(data["cost_ns"]), baseline=baseline)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("cost curve %s unusable (%s); measuring again", path, e)
            return None

    def save(self, backend: "Backend", cost: CostModel) -> None:
        """Writes the curve atomically (a temporary file renamed over the old one)."""
        key = self._key(backend)
        path = self.folder / key.file_name()
        data = {"version": VERSION, "key": asdict(key), "tokens": list(cost.tokens),
                "cost_ns": [float(c) for c in cost.at(np.asarray(cost.tokens))],  # the scale folded in
                "baseline_tokens": list(cost.baseline[0]), "baseline_cost_ns": list(cost.baseline[1])}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cost curve not kept in %s: %s", self.folder, e)

    def load_or_measure(self, backend: "Backend", max_tokens: int) -> CostModel:
        """The kept curve, else one measured now (and kept)."""
        cost = self.load(backend)
        if cost is None:
            log.info("measuring the %s backend's step cost (once per model and machine)", backend.kind)
            cost = CostModel.measure(backend, max_tokens=max_tokens)
            self.save(backend, cost)
        return cost
