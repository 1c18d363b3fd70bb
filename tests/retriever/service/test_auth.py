"""Retriever auth and transport security end to end: real servers on free loopback ports.

Bearer tokens bound to tenants (OK / UNAUTHENTICATED / PERMISSION_DENIED for Draft, a
DraftBatch with one foreign tenant, a DraftStream switching tenant, EndSession), admin vs
non-admin Describe, the tokens file formats, TLS and mTLS with certificates made here by the
`openssl` CLI (a client without a certificate, or with one from another CA, is refused),
denials counted in the scraped /metrics by RPC and code, and no token ever in the logs.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever import errors
from retriever.client import DraftCall, RetrieverClient
from retriever.client.channel import ChannelSecurity
from retriever.credentials import load_tokens
from retriever.service.cli import settings_from_args
from retriever.service.server import create_server
from tests.retriever.service.helpers import PROMPT, settings

TOKEN_A, TOKEN_BC, TOKEN_ALL, TOKEN_ADMIN = "tok-a-5f1c9e", "tok-bc-77d0aa", "tok-all-0b3e", "tok-admin-c4a1"
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    bc_digest = hashlib.sha256(TOKEN_BC.encode()).hexdigest()
    path.write_text(f"# tenant tokens\n{TOKEN_A} a\nsha256:{bc_digest} b,c\n\n{TOKEN_ALL} *\n{TOKEN_ADMIN} - admin\n")
    return path


class Served:
    """A started server (`create_server`) with the indexes loaded; `client(...)` opens clients."""

    def __init__(self, s) -> None:
        self.server, self.port = create_server(s)
        assert self.server.wait_ready(30)
        self.target = f"127.0.0.1:{self.port}"
        self.clients: list[RetrieverClient] = []

    def client(self, **security) -> RetrieverClient:
        c = RetrieverClient(self.target, 5.0, security=ChannelSecurity(**security) if security else None)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        assert self.server.stop(0).wait(10)


@pytest.fixture(scope="module")
def authed(data, tokens_file):  # noqa: F811
    served = Served(settings(indexes=(str(data[0]),), auth_tokens_file=str(tokens_file), metrics_port=0))
    yield served
    served.close()


def raw_stub(served: Served, token: str | None = None, scheme: str = "Bearer"):
    channel = grpc.insecure_channel(served.target)
    metadata = (("authorization", f"{scheme} {token}"),) if token is not None else None
    return channel, pb_grpc.RetrieverStub(channel), metadata


def draft_req(tenant: str, session_id: str = "s", prompt=PROMPT) -> pb.DraftRequest:
    return pb.DraftRequest(tenant=tenant, session_id=session_id, prompt=list(prompt), max_nodes=4)


# ---------------------------------------------------------------- the tokens file


def test_tokens_file_lines_and_json(tokens_file, tmp_path):
    table = load_tokens(str(tokens_file))
    a, bc, all_, admin = (table.principal_of(t) for t in (TOKEN_A, TOKEN_BC, TOKEN_ALL, TOKEN_ADMIN))
    assert (a.tenants, a.admin, a.label) == (frozenset({"a"}), False, "line 2")
    assert bc.tenants == frozenset({"b", "c"}) and all_.tenants is None and all_.allows("anyone")
    assert admin.admin and admin.tenants == frozenset() and table.principal_of("nope") is None
    j = tmp_path / "tokens.json"
    j.write_text('{"tokens": [{"token": "x1", "tenants": ["a"], "name": "svc-a"}, {"token": "x2", "tenants": "*", '
                 '"admin": true}]}')
    jt = load_tokens(str(j))
    assert jt.principal_of("x1").label == "svc-a" and jt.principal_of("x2").admin


@pytest.mark.parametrize("text, message", [
    ("SeCrEt a extra", "line 1 must be 'TOKEN TENANTS [admin]', got 3 fields"),
    ("SeCrEt", "line 1 must be 'TOKEN TENANTS [admin]', got 1 fields"),
    ("sha256:abc a", "token 'sha256:...' must hold 64 hex digits, got 3 characters"),
    ("SeCrEt a\nSeCrEt b", "must hold each token once, got a repeated token"),
    ("# nothing\n", "must hold at least one token, got none"),
    ("SeCrEt a,,b", "tenants must be '*', '-' or non-empty tenant names, got 'a,,b'"),
    ('{"tokens": [{"token": "SeCrEt", "admin": "yes"}]}', "tokens[0].admin must be a boolean, got 'yes'"),
    ('{"tokens": {}', "must be valid JSON"),
])
def test_tokens_file_errors_are_precise_and_never_show_tokens(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_tokens(str(path))
    assert message in str(info.value)
    assert "SeCrEt" not in str(info.value)


def test_a_bad_tokens_file_stops_the_server_from_starting(tmp_path):
    with pytest.raises(OSError, match="auth tokens file must be a readable UTF-8 file"):
        create_server(settings(auth_tokens_file=str(tmp_path / "missing")))


# ---------------------------------------------------------------- tokens bound to tenants


@pytest.mark.parametrize("token, scheme, detail", [
    (None, "Bearer", "metadata 'authorization' must be 'Bearer <token>', got none"),
    ("nope", "Bearer", "bearer token must be one of the retriever's tokens, got an unknown one"),
    (TOKEN_A, "Basic", "metadata 'authorization' must be 'Bearer <token>', got a value without the 'Bearer ' prefix"),
])
def test_calls_without_a_valid_token_are_unauthenticated(authed, token, scheme, detail):
    channel, stub, metadata = raw_stub(authed, token, scheme)
    calls = [(stub.Draft, draft_req("a")), (stub.Describe, pb.DescribeRequest()),
             (stub.EndSession, pb.EndSessionRequest(tenant="a", session_id="s")),
             (stub.DraftBatch, pb.DraftBatchRequest(requests=[draft_req("a")]))]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=metadata, timeout=5)
        assert (info.value.code(), info.value.details()) == (UNAUTH, detail)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.DraftStream(iter([draft_req("a")]), metadata=metadata, timeout=5))
    assert info.value.code() == UNAUTH
    channel.close()


def test_a_token_drafts_for_its_tenants_only(authed):
    a, bc = authed.client(token=TOKEN_A), authed.client(token=TOKEN_BC)
    assert a.draft("a", "s1", PROMPT, max_nodes=4).context_tokens == len(PROMPT)
    assert bc.draft("c", "s1", PROMPT, max_nodes=4).context_tokens == len(PROMPT)
    with pytest.raises(errors.PermissionDenied) as info:
        a.draft("b", "s1", PROMPT)
    assert str(info.value) == "PERMISSION_DENIED: tenant must be a tenant of the caller's token (line 2), got 'b'"
    with pytest.raises(errors.PermissionDenied, match="got 'a'"):
        bc.end_session("a", "s1")
    with pytest.raises(errors.PermissionDenied, match=r"x{128}\.\.\.' \(300 characters\)"):
        a.draft("x" * 300, "s1", PROMPT)
    assert a.end_session("a", "s1") == 0
    assert authed.client(token=TOKEN_ALL).draft("zeta", "s", PROMPT).context_tokens == len(PROMPT)
    with pytest.raises(errors.PermissionDenied):  # admin-only: no tenants
        authed.client(token=TOKEN_ADMIN).draft("a", "s", PROMPT)


def test_a_batch_with_one_foreign_tenant_is_denied_whole_and_leaves_no_state(authed):
    a = authed.client(token=TOKEN_A)
    calls = [DraftCall("a", "batch-1", PROMPT), DraftCall("b", "batch-2", PROMPT), DraftCall("a", "batch-3", PROMPT)]
    with pytest.raises(errors.PermissionDenied) as info:
        a.draft_batch(calls)
    assert "requests[1].tenant must be a tenant of the caller's token (line 2), got 'b'" in str(info.value)
    with pytest.raises(errors.NotFound):  # item 0 never ran: its session does not exist
        a.draft("a", "batch-1", None, [7])
    assert all(not isinstance(r, Exception) for r in a.draft_batch([calls[0], calls[2]]))


def test_a_stream_switching_tenant_is_denied_after_the_allowed_requests(authed):
    channel, stub, metadata = raw_stub(authed, TOKEN_A)
    requests = [draft_req("a", "st"), pb.DraftRequest(tenant="a", session_id="st", new_tokens=[7]),
                draft_req("b", "st"), draft_req("a", "st2")]
    call = stub.DraftStream(iter(requests), metadata=metadata, timeout=5)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            got.append(response)
    assert len(got) == 2 and got[1].context_tokens == len(PROMPT) + 1
    assert (info.value.code(), info.value.details()) == (
        DENIED, "tenant must be a tenant of the caller's token (line 2), got 'b'")
    channel.close()


def denials(served: Served) -> dict[tuple[str, str], float]:
    """specdraft_retriever_auth_denials_total by (rpc, code), scraped from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("specdraft_retriever_auth_denials_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["rpc"].strip('"'), labels["code"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def test_denials_are_counted_by_rpc_and_code_without_tokens_or_tenants(authed):
    before = denials(authed)
    a = authed.client(token=TOKEN_A)
    for _ in range(2):
        with pytest.raises(errors.PermissionDenied):
            a.draft("tenant-secret-name", "s", PROMPT)
    with pytest.raises(errors.PermissionDenied):
        a.draft_batch([DraftCall("b", "s", PROMPT)])
    with pytest.raises(errors.Unauthenticated):
        authed.client(token="wrong-token-9d1").end_session("a", "s")
    channel, stub, metadata = raw_stub(authed, TOKEN_A)
    with pytest.raises(grpc.RpcError):
        list(stub.DraftStream(iter([draft_req("b")]), metadata=metadata, timeout=5))
    channel.close()
    after = denials(authed)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert delta == {("Draft", "PERMISSION_DENIED"): 2, ("DraftBatch", "PERMISSION_DENIED"): 1,
                     ("EndSession", "UNAUTHENTICATED"): 1, ("DraftStream", "PERMISSION_DENIED"): 1}
    with urllib.request.urlopen(f"http://127.0.0.1:{authed.server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "tenant-secret-name" not in text and TOKEN_A not in text and "wrong-token-9d1" not in text


def test_describe_shows_index_paths_to_admins_only(authed, data):  # noqa: F811
    tenant_view = authed.client(token=TOKEN_A).describe()
    admin_view = authed.client(token=TOKEN_ADMIN).describe()
    assert [i.path for i in tenant_view.indexes] == [""] and tenant_view.indexes[0].name == "toy-corpus"
    assert [i.path for i in admin_view.indexes] == [str(data[0])]
    with pytest.raises(errors.Unauthenticated):
        authed.client().describe()


def test_auth_is_off_without_a_tokens_file(data):  # noqa: F811
    served = Served(settings(indexes=(str(data[0]),)))
    try:
        c = served.client()
        assert c.draft("anyone", "s", PROMPT).context_tokens == len(PROMPT)
        assert [i.path for i in c.describe().indexes] == [str(data[0])]
    finally:
        served.close()


def test_logs_never_contain_tokens(data, tokens_file, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    served = Served(settings(indexes=(str(data[0]),), auth_tokens_file=str(tokens_file)))
    try:
        for token in (TOKEN_A, TOKEN_BC, "wrong-secret-token"):
            with pytest.raises(errors.SpecdraftError):
                served.client(token=token).draft("zzz", "s", PROMPT)
        served.client(token=TOKEN_ADMIN).describe()
    finally:
        served.close()
    assert "denied (PERMISSION_DENIED)" in caplog.text and "denied (UNAUTHENTICATED)" in caplog.text
    for secret in (TOKEN_A, TOKEN_BC, TOKEN_ADMIN, "wrong-secret-token", hashlib.sha256(TOKEN_BC.encode()).hexdigest()):
        assert secret not in caplog.text


# ---------------------------------------------------------------- TLS and mTLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _make_cert(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """ca (server + client certs), other-ca (a client cert the server must refuse)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_cert(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


def test_tls_serves_verified_clients_only(data, certs):  # noqa: F811
    s = settings(indexes=(str(data[0]),), tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    served = Served(s)
    try:
        assert served.client(root_ca=str(certs / "ca.pem")).draft("a", "s", PROMPT).context_tokens == len(PROMPT)
        for security in ({}, {"root_ca": str(certs / "other-ca.pem")}):  # plaintext; a CA that did not sign it
            with pytest.raises(errors.Unavailable):
                served.client(**security).draft("a", "s", PROMPT, timeout_s=2)
    finally:
        served.close()


def test_mtls_requires_a_client_certificate_from_the_ca(data, certs, tokens_file):  # noqa: F811
    s = settings(indexes=(str(data[0]),), tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                 tls_client_ca=str(certs / "ca.pem"), auth_tokens_file=str(tokens_file))
    served = Served(s)
    ca = str(certs / "ca.pem")
    try:
        good = served.client(root_ca=ca, client_cert=str(certs / "client.pem"), client_key=str(certs / "client.key"),
                             token=TOKEN_A)
        assert good.draft("a", "s", PROMPT).context_tokens == len(PROMPT)
        with pytest.raises(errors.PermissionDenied):  # mTLS and tokens together
            good.draft("b", "s", PROMPT)
        stranger = {"client_cert": str(certs / "stranger.pem"), "client_key": str(certs / "stranger.key")}
        for security in ({"root_ca": ca, "token": TOKEN_A}, {"root_ca": ca, "token": TOKEN_A, **stranger}):
            with pytest.raises(errors.Unavailable):
                served.client(**security).draft("a", "s", PROMPT, timeout_s=2)
    finally:
        served.close()


# ---------------------------------------------------------------- settings and flags


TOGETHER = "SPECDRAFT_TLS_CERT and SPECDRAFT_TLS_KEY must be set together, got only "


@pytest.mark.parametrize("changes, message", [
    ({"tls_cert": "c.pem"}, TOGETHER + "SPECDRAFT_TLS_CERT"),
    ({"tls_key": "k.pem"}, TOGETHER + "SPECDRAFT_TLS_KEY"),
    ({"tls_client_ca": "ca.pem"}, "SPECDRAFT_TLS_CERT must be set when SPECDRAFT_TLS_CLIENT_CA is (mTLS), got ''"),
])
def test_tls_settings_are_checked(changes, message):
    with pytest.raises(ValueError) as info:
        settings(**changes)
    assert str(info.value) == message


def test_flags_and_environment_reach_the_settings(tmp_path):
    import argparse

    from retriever.service import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["retriever", "serve", "--auth-tokens", "t.txt", "--tls-cert", "c.pem",
                              "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"])
    s = settings_from_args(args)
    assert (s.auth_tokens_file, s.tls_cert, s.tls_key, s.tls_client_ca) == ("t.txt", "c.pem", "k.pem", "ca.pem")
    from retriever.service.settings import RetrieverSettings

    env = RetrieverSettings.from_env({"SPECDRAFT_AUTH_TOKENS_FILE": "/etc/specdraft/tokens"})
    assert env.auth_tokens_file == "/etc/specdraft/tokens" and env.tls_cert == ""
    with pytest.raises(ValueError, match="client_cert and client_key must be given together, got only client_cert"):
        ChannelSecurity(client_cert="c.pem")
    assert TOKEN_A not in repr(ChannelSecurity(token=TOKEN_A))


def test_a_token_sent_without_the_bearer_prefix_is_never_echoed_and_refusals_are_summarized(data, tokens_file,
                                                                                          caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    served = Served(settings(indexes=(str(data[0]),), auth_tokens_file=str(tokens_file)))
    channel = grpc.insecure_channel(served.target)
    stub = pb_grpc.RetrieverStub(channel)
    details = set()
    try:
        for i in range(1000):
            metadata = (("authorization", TOKEN_A if i % 2 else f"{TOKEN_ALL} extra"),)
            with pytest.raises(grpc.RpcError) as info:
                stub.Draft(draft_req("a"), metadata=metadata, timeout=5)
            assert info.value.code() == UNAUTH
            details.add(info.value.details())
    finally:
        channel.close()
        served.close()
    assert details == {"metadata 'authorization' must be 'Bearer <token>', got a value without the 'Bearer ' prefix"}
    lines = [r for r in caplog.records if "denied (UNAUTHENTICATED)" in r.getMessage()]
    assert 1 <= len(lines) <= 10  # one summary per 10 s, not one line per refusal
    for secret in (TOKEN_A, TOKEN_ALL, TOKEN_A[:6], TOKEN_ALL[:6]):
        assert secret not in caplog.text
