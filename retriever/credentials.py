"""Credentials in files, shared by both services and the client: bearer tokens bound to tenants
(the tokens file of the retriever and of the verifier's own APIs, and who a call's token is), a
client's one-token file (`read_token_file`) and PEM files (`read_pem`).

File formats (`load_tokens(path, owner)`), one token per entry:

- lines: `TOKEN TENANTS [admin]`; TENANTS is `tenant[,tenant...]`, `*` (every tenant) or `-`
  (none: an admin-only credential); blank lines and lines starting with `#` are skipped.
- JSON: `{"tokens": [{"token": "...", "tenants": ["a", "b"] | "*", "admin": false, "name": "..."}]}`.

TOKEN may be given as `sha256:<64 hex>` so the file need not hold the secret itself. Only
sha256 digests are kept in memory and compared (`hmac.compare_digest`, every entry, no
early exit). A token's `label` ("name" or "line N"/"entry N") is what logs show, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from retriever.errors import Unauthenticated

log = logging.getLogger(__name__)
ALL_TENANTS = "*"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Principal:
    """Who a valid token is: its tenants (None: every tenant), admin rights, a log label."""

    tenants: frozenset[str] | None
    admin: bool
    label: str

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


@dataclass(frozen=True)
class TokenGrant:
    """One entry of the tokens file: the token's sha256 digest and whom it stands for."""

    digest: bytes
    principal: Principal


@dataclass(frozen=True)
class TokenTable:
    """Every grant of a tokens file; `principal_of` resolves a bearer token. `owner` names the
    server in messages ("retriever" or "verifier")."""

    grants: tuple[TokenGrant, ...]
    owner: str = "retriever"

    def principal_of(self, token: str) -> Principal | None:
        """The token's principal, or None; compares the digest with every grant in constant time each."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for grant in self.grants:
            if hmac.compare_digest(digest, grant.digest) and found is None:
                found = grant.principal
        return found

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of the call's `authorization: Bearer <token>` metadata.

        Raises Unauthenticated (missing, malformed or unknown token; the token is never in the message).
        """
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        return self.authenticate_values(values, "metadata 'authorization'")

    def authenticate_values(self, values: Sequence[str | bytes], what: str) -> Principal:
        """The principal of `Bearer <token>` given as the values of `what` (a header or metadata key).

        Raises Unauthenticated; its message never holds any part of the value (not even its scheme,
        which may be a token sent without the prefix).
        """
        if not values:
            raise Unauthenticated(f"{what} must be 'Bearer <token>', got none")
        if len(values) > 1:
            raise Unauthenticated(f"{what} must be given once, got {len(values)} values")
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":  # the first word may be the token itself: never shown
            raise Unauthenticated(f"{what} must be 'Bearer <token>', got a value without the 'Bearer ' prefix")
        if not token.strip():
            raise Unauthenticated(f"{what} must be 'Bearer <token>', got 'Bearer' without a token")
        principal = self.principal_of(token.strip())
        if principal is None:
            raise Unauthenticated(f"bearer token must be one of the {self.owner}'s tokens, got an unknown one")
        return principal


def token_digest(text: str) -> bytes:
    """A file entry's token as its sha256 digest (`sha256:<hex>` as given, else hashed)."""
    if text.startswith("sha256:"):
        hex_digest = text[len("sha256:"):].lower()
        if not _HEX64.fullmatch(hex_digest):
            raise ValueError(f"token 'sha256:...' must hold 64 hex digits, got {len(hex_digest)} characters")
        return bytes.fromhex(hex_digest)
    return hashlib.sha256(text.encode("utf-8")).digest()


def _tenants(spec: object, where: str) -> frozenset[str] | None:
    if spec == ALL_TENANTS:
        return None
    if spec == "-":
        return frozenset()
    items = spec.split(",") if isinstance(spec, str) else spec
    if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
        raise ValueError(f"{where}: tenants must be '*', '-' or non-empty tenant names, got {spec!r}")
    return frozenset(t.strip() for t in items)


def _parse_lines(text: str, path: str) -> list[TokenGrant]:
    grants = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{path} line {n}"
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
            raise ValueError(f"{where} must be 'TOKEN TENANTS [admin]', got {len(parts)} fields")
        principal = Principal(_tenants(parts[1], where), len(parts) == 3, f"line {n}")
        grants.append(TokenGrant(token_digest(parts[0]), principal))
    return grants


def _parse_json(text: str, path: str) -> list[TokenGrant]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} must be valid JSON, got {e.msg} at line {e.lineno}") from None
    entries = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold {{\"tokens\": [...]}}, got {type(doc).__name__}")
    grants = []
    for i, entry in enumerate(entries):
        where = f"{path} tokens[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str) or not entry["token"]:
            raise ValueError(f"{where} must be an object with a non-empty 'token', got {type(entry).__name__}")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where}.admin must be a boolean, got {admin!r}")
        label = entry.get("name") if isinstance(entry.get("name"), str) else f"entry {i}"
        grants.append(TokenGrant(token_digest(entry["token"]),
                                 Principal(_tenants(entry.get("tenants", "-"), where), admin, label)))
    return grants


def load_tokens(path: str, owner: str = "retriever") -> TokenTable:
    """The tokens file at `path` (JSON when it starts with `{`, else lines); ValueError when invalid.
    `owner` names the server in authentication messages."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"auth tokens file must be a readable UTF-8 file, got {path} ({e})") from None
    grants = _parse_json(text, path) if text.lstrip().startswith("{") else _parse_lines(text, path)
    if not grants:
        raise ValueError(f"auth tokens file must hold at least one token, got none in {path}")
    digests = [g.digest for g in grants]
    if len(set(digests)) != len(digests):
        raise ValueError(f"auth tokens file must hold each token once, got a repeated token in {path}")
    return TokenTable(tuple(grants), owner)


def read_pem(path: str, name: str) -> bytes:
    """The bytes of a PEM file; ValueError naming `name` (its setting) when unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{name} must be a readable PEM file, got {path} ({e.strerror})") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{name} must be a PEM file, got {path} without a '-----BEGIN' block")
    return data


def read_token_file(path: str, what: str) -> str:
    """The bearer token in the file at `path`: its one line that is not blank or a `#` comment.

    ValueError names `what` (the setting) and never shows the token; a file others can read is
    accepted with a warning.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} must be a readable UTF-8 file, got {path} ({getattr(e, 'strerror', None) or e})") \
            from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1 or any(c.isspace() for c in lines[0]):
        shape = f"{len(lines)} token lines" if len(lines) != 1 else "a line with whitespace"
        raise ValueError(f"{what} must hold one token (one line, no whitespace), got {shape} in {path}")
    if mode & 0o077:
        log.warning("%s %s is readable by other users (mode %o): keep bearer tokens owner-only", what, path,
                    mode & 0o777)
    return lines[0]
