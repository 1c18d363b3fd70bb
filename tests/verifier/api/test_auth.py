"""Verifier auth end to end: real servers on free loopback ports, the SmolLM2 model, certificates
made by the `openssl` CLI (tests.retriever.service.test_auth's `certs`).

- As a client of an authenticated mTLS retriever: with the right token drafts are accepted and
  the greedy text equals plain decoding; with a token for another tenant, or an unknown token,
  every generation still completes with plain decoding's text, the refusal is logged once (no
  token), and the retriever sees at most one refused stream for two generations (no retry loop).
- Its own APIs with a tokens file: the HTTP API (the `openai` client and raw requests: 401 /
  403 in OpenAI's error shape, the token's tenant drafts, admin-only /metrics) and gRPC
  Generate (UNAUTHENTICATED / PERMISSION_DENIED), refusals counted in the metrics; its own
  gRPC and HTTP servers over mTLS.
- Settings, flags and the token file reader, with precise messages that never show a token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from protos.specdraft.v1 import verifier_pb2 as pb
from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from retriever import errors
from retriever.credentials import Principal, read_token_file
from tests.retriever.service.test_auth import certs  # noqa: F401 - a fixture
from tests.verifier.api.test_service import REPEAT
from verifier.api.auth import tenant_for
from verifier.api.settings import VerifierSettings

N = 10  # new tokens per generation: short, the machine is shared
R_TOKEN_A, R_TOKEN_B = "r-tok-a-61f0c2", "r-tok-b-0e93d7"  # the retriever's tokens
V_TOKEN_A, V_TOKEN_BC, V_TOKEN_ADMIN = "v-tok-a-8d21", "v-tok-bc-3c7f", "v-tok-admin-52e0"  # the verifier's
SECRETS = (R_TOKEN_A, R_TOKEN_B, V_TOKEN_A, V_TOKEN_BC, V_TOKEN_ADMIN, "r-wrong-77ab", "v-wrong-19cd")


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def engine(smollm2):
    """A flat cost model (verify every draft node) keeps drafting independent of the machine's load."""
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    return Engine(smollm2, CostModel.flat())


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("secrets")
    _private(d / "retriever-tokens", f"{R_TOKEN_A} a\n{R_TOKEN_B} b\n")
    _private(d / "verifier-tokens", f"{V_TOKEN_A} a\n{V_TOKEN_BC} b,c\n{V_TOKEN_ADMIN} - admin\n")
    for name, token in (("a", R_TOKEN_A), ("b", R_TOKEN_B), ("wrong", "r-wrong-77ab")):
        _private(d / f"token-{name}", f"# the verifier's token for the retriever\n{token}\n")
    return d


@pytest.fixture(scope="module")
def mtls_retriever(certs, secrets_dir):  # noqa: F811
    """A retriever (no indexes: context drafts) with tokens, TLS and client certificates required."""
    from retriever.service.server import create_server
    from tests.retriever.service.helpers import loopback_settings

    server, port = create_server(loopback_settings(
        output_log="off", metrics_port=0,
        auth_tokens_file=str(secrets_dir / "retriever-tokens"), tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem")))
    assert server.wait_ready(10)
    yield server, f"127.0.0.1:{port}"
    server.stop(0).wait()


@contextlib.contextmanager
def verifier(engine, **changes):
    """A started verifier server (gRPC on a free port, HTTP off unless asked for)."""
    from verifier.api.server import create_server

    base = dict(host="127.0.0.1", port=0, http_port=-1, max_new_tokens_cap=256)
    server, port = create_server(VerifierSettings(**{**base, **changes}), engine=engine)
    try:
        yield server, port
    finally:
        server.stop(0).wait()


def _generate(port: int, tenant: str, no_draft: bool = False, metadata=None) -> tuple[str, pb.GenerateStats]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        req = pb.GenerateRequest(text=REPEAT, tenant=tenant, no_draft=no_draft,
                                 sampling=pb.SamplingParams(max_new_tokens=N))
        responses = list(pb_grpc.VerifierStub(channel).Generate(req, metadata=metadata, timeout=120))
    return "".join(r.text for r in responses), responses[-1].stats


def _scrape(port: int, path: str = "/metrics", token: str | None = None) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and ",".join(sorted(head[len(name) + 1:-1].split(","))) == want:
            return float(value)
        if head == name and not labels:
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def plain(engine) -> str:
    """Plain decoding's text of the prompt (no retriever)."""
    with verifier(engine) as (_, port):
        return _generate(port, "a", no_draft=True)[0]


def _tls(certs, secrets_dir, token: str) -> dict:  # noqa: F811
    return dict(retriever_token_file=str(secrets_dir / f"token-{token}"), retriever_ca=str(certs / "ca.pem"),
                retriever_client_cert=str(certs / "client.pem"), retriever_client_key=str(certs / "client.key"),
                retriever_server_name="localhost")


# ---------------------------------------------------------------- the verifier as the retriever's client


def test_the_right_token_drafts_over_mtls(engine, mtls_retriever, certs, secrets_dir, plain):  # noqa: F811
    _, target = mtls_retriever
    with verifier(engine, retriever=target, **_tls(certs, secrets_dir, "a")) as (_, port):
        text, stats = _generate(port, "a")
    assert text == plain
    assert stats.accepted_draft_tokens > 0 and sum(s.tokens for s in stats.accepted_by_source) > 0


@pytest.mark.parametrize("token, code", [("b", "PERMISSION_DENIED"), ("wrong", "UNAUTHENTICATED")])
def test_a_refused_token_decodes_plainly_logs_once_and_does_not_retry(engine, mtls_retriever, certs, secrets_dir,
                                                                      plain, caplog, token, code):  # noqa: F811
    server, target = mtls_retriever
    before = _sample(_scrape(server.metrics_port), "specdraft_retriever_auth_denials_total", code=code,
                     rpc="DraftStream")
    caplog.set_level(logging.DEBUG)
    with verifier(engine, retriever=target, http_port=0, **_tls(certs, secrets_dir, token)) as (vs, port):
        runs = [_generate(port, "a") for _ in range(2)]
        metrics = _scrape(vs.http_port)
    assert [text for text, _ in runs] == [plain, plain]
    assert all(stats.accepted_draft_tokens == 0 for _, stats in runs)
    refusals = [r for r in caplog.records if "refused the verifier's credential" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING and code in refusals[0].getMessage()
    assert _sample(metrics, "specdraft_verifier_draft_fallbacks_total", reason="denied") >= N
    after = _sample(_scrape(server.metrics_port), "specdraft_retriever_auth_denials_total", code=code,
                    rpc="DraftStream")
    assert after - before <= 1  # one refused stream at most for both generations: the client holds off
    for secret in SECRETS:
        assert secret not in caplog.text


# ---------------------------------------------------------------- the verifier's own APIs


@pytest.fixture(scope="module")
def authed(engine, secrets_dir):
    with verifier(engine, http_port=0, auth_tokens_file=str(secrets_dir / "verifier-tokens")) as (server, port):
        yield server, port


def _post(port: int, path: str, body: dict, token: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_http_needs_a_token_and_answers_in_openais_error_shape(authed):
    server, _ = authed
    body = {"model": "smollm2", "prompt": "def f(", "max_tokens": 1}
    status, headers, err = _post(server.http_port, "/v1/completions", body)
    assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert err == {"error": {"message": "header 'Authorization' must be 'Bearer <token>', got none",
                             "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    status, _, err = _post(server.http_port, "/v1/completions", body, token="v-wrong-19cd")
    assert status == 401 and err["error"]["message"] == (
        "bearer token must be one of the verifier's tokens, got an unknown one")
    url = f"http://127.0.0.1:{server.http_port}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="v-wrong-19cd", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=url, api_key=V_TOKEN_A, max_retries=0).models.list()] == ["smollm2"]
    assert json.loads(_scrape(server.http_port, "/health"))["status"] == "ok"  # probes need no token


def test_http_drafts_for_the_tokens_tenant_and_refuses_others(authed):
    server, _ = authed
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=V_TOKEN_A, max_retries=0,
                           timeout=120)
    r = client.completions.create(model="smollm2", prompt="def f(", max_tokens=2, temperature=0)
    assert r.model_extra["specdraft"]["tenant"] == "a"  # the token's only tenant, none named
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.completions.create(model="smollm2", prompt="def f(", max_tokens=2, user="b")
    assert info.value.body["code"] == "permission_denied"
    assert info.value.body["message"] == "user must be a tenant of the caller's token (line 1), got 'b'"
    status, _, err = _post(server.http_port, "/v1/completions", {"prompt": "x", "max_tokens": 1}, V_TOKEN_BC)
    assert status == 400 and err["error"]["param"] == "user" and "of the caller's token's 2 tenants" in (
        err["error"]["message"])
    bc = openai.OpenAI(base_url=client.base_url, api_key=V_TOKEN_BC, max_retries=0, timeout=120)
    r = bc.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                   extra_headers={"X-Specdraft-Tenant": "c"})
    assert r.model_extra["specdraft"]["tenant"] == "c"



def test_infill_takes_the_same_auth_and_tenants_in_llama_cpps_error_shape(authed):
    """/infill (llama.cpp's route) is guarded like /v1/completions; its errors are llama.cpp's JSON."""
    server, _ = authed
    body = {"input_prefix": "def f(", "input_suffix": "\n", "n_predict": 1}
    status, headers, err = _post(server.http_port, "/infill", body)
    assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert err == {"error": {"code": 401, "message": "header 'Authorization' must be 'Bearer <token>', got none",
                             "type": "invalid_request_error"}}
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/infill", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {V_TOKEN_A}", "X-Specdraft-Tenant": "b"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=120)
    assert info.value.code == 403 and json.loads(info.value.read())["error"]["code"] == 403
    status, _, err = _post(server.http_port, "/infill", body, V_TOKEN_BC)  # 2 tenants, none named: no `user` here
    assert status == 400 and err["error"]["message"].startswith(
        "the X-Specdraft-Tenant header must name one of the caller's token's 2 tenants")
    status, _, err = _post(server.http_port, "/infill", body, V_TOKEN_A)  # past auth: SmolLM2 has no FIM tokens
    assert status == 400 and err["error"]["message"] == "model smollm2 has no fill-in-the-middle tokens"


def test_a_token_without_the_bearer_prefix_is_never_echoed_and_refusals_are_summarized(authed, caplog):
    server, port = authed
    caplog.set_level(logging.DEBUG)
    messages = set()
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for i in range(500):  # HTTP: the token as the whole header, or as its first word
        header = V_TOKEN_A if i % 2 else f"{V_TOKEN_BC} trailing"
        req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": header})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 401
        messages.add(json.loads(info.value.read())["error"]["message"])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.VerifierStub(channel)
        req = pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_new_tokens=1))
        for _ in range(500):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(req, metadata=(("authorization", V_TOKEN_A),), timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            messages.add(info.value.details())
    assert messages == {"header 'Authorization' must be 'Bearer <token>', got a value without the 'Bearer ' prefix",
                        "metadata 'authorization' must be 'Bearer <token>', got a value without the 'Bearer ' prefix"}
    lines = [r for r in caplog.records if "denied (UNAUTHENTICATED)" in r.getMessage()]
    assert len(lines) <= 10  # one summary per route and kind per 10 s, not 1,000 lines
    for secret in (V_TOKEN_A, V_TOKEN_BC, V_TOKEN_A[:6], V_TOKEN_BC[:6]):
        assert secret not in caplog.text

def test_metrics_need_an_admin_token_and_count_refusals(authed):
    server, port = authed
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.VerifierStub(channel)
        req = pb.GenerateRequest(text="def f(", tenant="b", sampling=pb.SamplingParams(max_new_tokens=1))
        for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", f"Bearer {V_TOKEN_A}"),), grpc.StatusCode.PERMISSION_DENIED)):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(req, metadata=metadata, timeout=30))
            assert info.value.code() == code
        ok = list(stub.Generate(pb.GenerateRequest(text="def f(", sampling=pb.SamplingParams(max_new_tokens=1)),
                                metadata=(("authorization", f"Bearer {V_TOKEN_A}"),), timeout=60))
        assert ok[-1].stats.new_tokens == 1
    for token, status in ((None, 401), (V_TOKEN_A, 403)):
        with pytest.raises(urllib.error.HTTPError) as info:
            _scrape(server.http_port, token=token)
        assert info.value.code == status
    text = _scrape(server.http_port, token=V_TOKEN_ADMIN)
    rejections = "specdraft_verifier_rejections_total"
    assert _sample(text, rejections, api="grpc", code="UNAUTHENTICATED", reason="unauthenticated") >= 1
    assert _sample(text, rejections, api="grpc", code="PERMISSION_DENIED", reason="permission_denied") >= 1
    assert _sample(text, rejections, api="http", code="403", reason="permission_denied") >= 1
    assert _sample(text, rejections, api="http", code="401", reason="invalid_api_key") >= 1
    for secret in SECRETS:
        assert secret not in text


def test_the_verifiers_own_servers_speak_mtls(engine, certs):  # noqa: F811
    import ssl

    from retriever.client.channel import ChannelSecurity, open_channel

    pem = {k: str(certs / f) for k, f in (("root_ca", "ca.pem"), ("client_cert", "client.pem"),
                                          ("client_key", "client.key"))}
    with verifier(engine, http_port=0, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                  tls_client_ca=str(certs / "ca.pem")) as (server, port):
        req = pb.GenerateRequest(text="def f(", sampling=pb.SamplingParams(max_new_tokens=1))
        with open_channel(f"127.0.0.1:{port}", ChannelSecurity(**pem)) as channel:
            assert list(pb_grpc.VerifierStub(channel).Generate(req, timeout=60))[-1].stats.new_tokens == 1
        with open_channel(f"127.0.0.1:{port}", ChannelSecurity(root_ca=pem["root_ca"])) as channel:
            with pytest.raises(grpc.RpcError) as info:  # no client certificate: the handshake fails
                list(pb_grpc.VerifierStub(channel).Generate(req, timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cafile=pem["root_ca"])
        context.load_cert_chain(pem["client_cert"], pem["client_key"])
        with openai.DefaultHttpxClient(verify=context) as http:
            client = openai.OpenAI(base_url=f"https://127.0.0.1:{server.http_port}/v1", api_key="unused",
                                   max_retries=0, http_client=http)
            assert [m.id for m in client.models.list()] == ["smollm2"]
        with pytest.raises(OSError):  # plaintext HTTP to an HTTPS port: refused or reset
            _scrape(server.http_port, "/health")


# ---------------------------------------------------------------- rules, settings and flags


A, BC, ADMIN = (Principal(frozenset({"a"}), False, "a"), Principal(frozenset({"b", "c"}), False, "bc"),
                Principal(frozenset(), True, "ops"))


@pytest.mark.parametrize("principal, requested, default, expected", [
    (None, "", "default", ""), (None, "x", "default", "x"), (Principal(None, False, "all"), "x", "d", "x"),
    (A, "", "default", "a"), (A, "a", "default", "a"), (BC, "", "c", "c"), (BC, "b", "default", "b"),
    (A, "b", "default", errors.PermissionDenied), (BC, "", "default", errors.InvalidArgument),
    (ADMIN, "", "default", errors.PermissionDenied), (ADMIN, "a", "default", errors.PermissionDenied),
])
def test_tenant_for(principal, requested, default, expected):
    if isinstance(expected, str):
        assert tenant_for(principal, requested, default, "tenant") == expected
    else:
        with pytest.raises(expected):
            tenant_for(principal, requested, default, "tenant")


def test_settings_from_env_and_their_messages(tmp_path):
    env = {"SPECDRAFT_VERIFIER_RETRIEVER_TLS": "yes", "SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE": "/etc/v-tokens",
           "SPECDRAFT_VERIFIER_RETRIEVER_SERVER_NAME": "retriever.internal"}
    s = VerifierSettings.from_env(env)
    assert (s.retriever_tls, s.auth_tokens_file, s.retriever_server_name) == (True, "/etc/v-tokens",
                                                                              "retriever.internal")
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_RETRIEVER_TLS must be 0 or 1 .*, got 'maybe'"):
        VerifierSettings.from_env({"SPECDRAFT_VERIFIER_RETRIEVER_TLS": "maybe"})
    with pytest.raises(ValueError) as info:
        VerifierSettings(retriever_client_cert="c.pem")
    assert str(info.value) == ("SPECDRAFT_VERIFIER_RETRIEVER_CLIENT_CERT and SPECDRAFT_VERIFIER_RETRIEVER_CLIENT_KEY "
                               "must be set together, got only SPECDRAFT_VERIFIER_RETRIEVER_CLIENT_CERT")
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_API_KEY must be empty when "
                                         "SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE is set") as info:
        VerifierSettings(api_key="k-secret-1", auth_tokens_file="t")
    assert "k-secret-1" not in str(info.value) and "k-secret-1" not in repr(VerifierSettings(api_key="k-secret-1"))
    security = VerifierSettings(retriever="h:1", retriever_ca="ca.pem", retriever_server_name="n").retriever_security()
    assert (security.secure, security.root_ca, security.server_name, security.token) == (True, "ca.pem", "n", None)


@pytest.mark.parametrize("text, message", [
    ("", "must hold one token (one line, no whitespace), got 0 token lines in"),
    ("t-secret-1\nt-secret-2\n", "got 2 token lines in"),
    ("t-secret-1 t-secret-2\n", "got a line with whitespace in"),
])
def test_token_file_errors_never_show_the_token(tmp_path, text, message):
    path = _private(tmp_path / "token", text)
    with pytest.raises(ValueError) as info:
        read_token_file(str(path), "SPECDRAFT_VERIFIER_RETRIEVER_TOKEN_FILE")
    assert str(info.value).startswith("SPECDRAFT_VERIFIER_RETRIEVER_TOKEN_FILE must ") and message in str(info.value)
    assert "t-secret" not in str(info.value)
    with pytest.raises(ValueError, match="must be a readable UTF-8 file, got .*missing"):
        read_token_file(str(tmp_path / "missing"), "X")


def test_a_token_file_others_can_read_is_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("t-secret-3\n")
    path.chmod(0o644)
    assert read_token_file(str(path), "X") == "t-secret-3"
    assert "readable by other users (mode 644)" in caplog.text and "t-secret-3" not in caplog.text


def test_bad_files_stop_the_server_before_it_binds(engine, tmp_path):
    from verifier.api.server import create_server

    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE: auth tokens file must be a readable"):
        create_server(VerifierSettings(port=0, http_port=-1, auth_tokens_file=str(tmp_path / "nope")), engine=engine)
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_TLS_CERT and SPECDRAFT_VERIFIER_TLS_KEY must be a PEM "
                                         "certificate chain and its key, got .*fake.pem"):
        create_server(VerifierSettings(port=0, http_port=-1, tls_cert=str(fake), tls_key=str(fake)), engine=engine)
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_RETRIEVER_CA must be a readable PEM file"):
        create_server(VerifierSettings(port=0, http_port=-1, retriever="127.0.0.1:1",
                                       retriever_ca=str(tmp_path / "nope.pem")), engine=engine)


def test_flags_reach_the_settings():
    from specdraft import generate
    from verifier.api import cli

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    cli.register(subparsers)
    generate.register(subparsers)
    args = parser.parse_args(["verifier", "serve", "--auth-tokens", "v.txt", "--retriever-token-file", "r.tok",
                              "--retriever-ca", "ca.pem", "--retriever-client-cert", "c.pem",
                              "--retriever-client-key", "c.key", "--retriever-server-name", "r.internal",
                              "--retriever-tls"])
    s = cli.settings_from_args(args, auth_tokens_file=args.auth_tokens)
    assert (s.auth_tokens_file, s.retriever_token_file, s.retriever_ca, s.retriever_client_cert,
            s.retriever_client_key, s.retriever_server_name, s.retriever_tls) == (
        "v.txt", "r.tok", "ca.pem", "c.pem", "c.key", "r.internal", True)
    gen = parser.parse_args(["generate", "x", "--verifier", "h:1", "--verifier-token-file", "v.tok"])
    assert (gen.verifier, gen.verifier_token_file) == ("h:1", "v.tok")
