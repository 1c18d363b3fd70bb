"""The verifier's OpenAI-compatible HTTP API (Starlette on uvicorn, in a thread of the gRPC process).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or, with `"stream": true`,
server-sent events `data: {...}` ending with `data: [DONE]`), `POST /infill` (llama.cpp's
fill-in-the-middle route, as llama.vscode calls it: `verifier.api.infill`; llama.cpp's JSON, events
and error shape `{"error": {code, message, type}}`, the same statuses), `GET /v1/models`,
`GET /v1/models/{name}`, `GET /health` (200, or 503 while stopping), `GET /metrics` (Prometheus,
`verifier.api.metrics`; refused requests are counted there). A thin shell:
`verifier.api.openai_wire.parse` -> `verifier.api.requests.check` -> `Generator.stream` (the lock the
gRPC servicer shares: one generation at a time) -> `openai_wire.Formatter`. Errors are OpenAI's
JSON (`{"error": {message, type, param, code}}`); after a stream has begun, an error is sent as
one `data: {"error": ...}` event. Bounds (`Generator`): beyond `settings.max_queued` waiting
generations a request gets 429 (`rate_limit_error`, code `queue_full`, a `Retry-After` header in
seconds); a request whose client leaves (streamed or not) stops its generation within one step;
past `settings.request_deadline_s` (wait + generation) a request gets 504 (`server_error`, code
`deadline_exceeded`; the partial text is dropped) or, once a stream has begun, that error as its
last event. Tenant: the `X-Specdraft-Tenant` header, else `user`.
Auth (`verifier.api.auth`): with a tokens file every route but /health needs `Authorization: Bearer
<token>` (401, `invalid_api_key`), a generation drafts for its token's tenant (naming another one:
403, `permission_denied`), /metrics needs an admin token (403); with the legacy
`settings.api_key`, every route but /health and /metrics needs that key.

Starlette rather than FastAPI: requests are validated by our own rules (`check`), so pydantic
models would only duplicate them and answer in another error shape. Prompt text is never logged.

`start_http(settings, tls=...) -> HttpApi`: bound (port 0: a free one; `tls`: HTTPS) and serving
on return, answering 503 (`/health`: {"status": "loading"}) until `HttpApi.serve(generator)` once
the model is loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, AsyncIterator

import anyio
import uvicorn
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from retriever import errors
from retriever.credentials import Principal
from verifier.api.auth import ApiAuth, ServerTls, api_auth, authorize_http, http_tenant
from verifier.api.metrics import VerifierMetrics, reason_label
from verifier.api.infill import INFILL_NAMES, InfillFormatter, error_body, parse_infill
from verifier.api.json_fields import ApiError
from verifier.api.openai_wire import NAMES, Formatter, parse
from verifier.api.pumps import Pump, Refused, Running, disconnected
from verifier.api.requests import FieldNames, GenerationRequest, InvalidField, RequestValues, check

if TYPE_CHECKING:
    from verifier.api.generation import Generator
    from verifier.api.settings import VerifierSettings

log = logging.getLogger(__name__)
TENANT_HEADER = "x-specdraft-tenant"
INFILL_PATH = "/infill"


class _Api:
    """The routes' state: settings, the shared generator, and the state: "loading" (no generator
    yet), "ok", "stopping"; generations are taken in state "ok" only."""

    def __init__(self, settings: "VerifierSettings", metrics: VerifierMetrics, auth: ApiAuth) -> None:
        self.settings, self.generator, self.metrics, self.auth = settings, None, metrics, auth
        self.name, self.created, self.state = settings.model_name, int(time.time()), "loading"
        self.running = Running()

    def authorize(self, request: Request, admin: bool = False) -> Principal | None:
        """The caller (None: auth off); ApiError 401 without a valid token, 403 when `admin` and not one."""
        return authorize_http(self.auth, request, admin)

    def scoped(self, request: Request, values: RequestValues, principal: Principal | None,
               body_field: str | None = "user") -> RequestValues:
        """`values` with the tenant its token drafts for (`body_field`: the body's tenant field, None:
        only the header names one); ApiError 403 (another tenant) or 400."""
        tenant = http_tenant(self.auth, principal, request, values.tenant, self.settings.default_tenant, body_field)
        return dataclasses.replace(values, tenant=tenant)

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "specdraft"}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(404, f"The model `{name}` does not exist (this server serves `{self.name}`)",
                           param="model", code="model_not_found")

    def generator_ready(self) -> "Generator":
        if self.state != "ok" or self.generator is None:
            raise ApiError(503, f"the server must be serving, got {self.state}", "server_error", code="unavailable")
        return self.generator

    def checked(self, generator: "Generator", values: RequestValues, names: FieldNames) -> GenerationRequest:
        """`check` with the wire format's field names; domain errors as ApiError (runs in a worker thread)."""
        try:
            return check(values, generator.model, self.settings, names)
        except InvalidField as e:
            raise ApiError.of(e, param=e.param, code=e.code) from None
        except errors.SpecdraftError as e:
            raise ApiError.of(e) from None

    def admit(self, generator: "Generator", request: GenerationRequest) -> Pump:
        """The generation's pump, admitted to the generator's queue now (its deadline starts now);
        ApiError 429 with a Retry-After hint when the queue is full."""
        limit = self.settings.request_deadline_s
        deadline = time.monotonic() + limit if limit > 0 else None
        stop = threading.Event()
        try:
            chunks = generator.stream(request, "http", stop.is_set, deadline)
        except errors.Overloaded as e:  # generation.QueueFull (not imported: it needs torch)
            raise Refused(ApiError.of(e, code="queue_full"), getattr(e, "retry_after_s", 1)) from None
        return Pump(chunks, stop, self.running)

    async def answer(self, pump: Pump, fmt: "Formatter | InfillFormatter", stream: bool, request: Request) -> Response:
        """The generation's answer: a stream of events, or one JSON response once it ends."""
        if stream:
            return StreamingResponse(self.sse(pump, fmt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.collect(pump, fmt, request.receive)

    async def collect(self, pump: Pump, fmt: "Formatter | InfillFormatter", receive: Receive) -> Response:
        """Runs one generation to its end; when the client leaves first (the ASGI receive channel
        says http.disconnect) the generation stops within one step and the answer is dropped."""
        parts, last = [], None
        async with pump as chunks:
            watch = asyncio.ensure_future(disconnected(receive, pump))
            try:
                async for chunk in chunks:
                    parts.append(chunk.text)
                    last = chunk
            finally:
                watch.cancel()
        if last is None or last.finish_reason is None:
            log.info("%s: the client left, generation cut after %d chunks", fmt.id, len(parts))
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(fmt.response("".join(parts), last))

    async def sse(self, pump: Pump, fmt: "Formatter | InfillFormatter") -> AsyncIterator[str]:
        """The stream's events; the generation stops (and the lock is freed) when the client leaves."""
        async with pump as chunks:
            try:
                for obj in fmt.opening():
                    yield _event(obj)
                async for chunk in chunks:
                    for obj in fmt.chunks(chunk):
                        yield _event(obj)
            except ApiError as e:  # the status is sent: report in the stream
                yield _event(fmt.error(e))
            except Exception as e:  # noqa: BLE001 - as above
                log.exception("generation %s failed mid-stream", fmt.id)
                yield _event(fmt.error(ApiError(500, f"the generation failed: {type(e).__name__}", "server_error")))
            if fmt.done:
                yield fmt.done


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _body(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body must be at most {limit} bytes, got {declared} bytes",
                       code="request_too_large")
    size = 0
    parts = []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the request body must be at most {limit} bytes, got more",
                           code="request_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body must be JSON, got invalid JSON ({e})") from None


class _Routes:
    """The route handlers over one `_Api`."""

    def __init__(self, api: _Api) -> None:
        self.api = api

    async def generate(self, request: Request, kind: str) -> Response:
        api = self.api
        principal = api.authorize(request)
        generator = api.generator_ready()
        body = await _body(request, api.settings.http_max_body_bytes)
        parsed = parse(kind, body, request.headers.get(TENANT_HEADER, ""))
        values = api.scoped(request, parsed.values, principal)
        api.check_model(parsed.model)
        checked = await anyio.to_thread.run_sync(api.checked, generator, values, NAMES[kind])
        fmt = Formatter.new(kind, api.name, checked.tenant, parsed.include_usage)
        log.info("%s %s: %d prompt tokens, tenant %s, stream %s", kind, fmt.id, len(checked.prompt_ids),
                 checked.tenant, parsed.stream)
        return await api.answer(api.admit(generator, checked), fmt, parsed.stream, request)

    async def infill(self, request: Request) -> Response:
        """llama.cpp's /infill (`verifier.api.infill`), through the generation path of /v1/completions."""
        api = self.api
        principal = api.authorize(request)
        generator = api.generator_ready()
        body = await _body(request, api.settings.http_max_body_bytes)
        parsed = parse_infill(body, request.headers.get(TENANT_HEADER, ""))
        values = api.scoped(request, parsed.values, principal, body_field=None)
        checked = await anyio.to_thread.run_sync(api.checked, generator, values, INFILL_NAMES)
        fmt = InfillFormatter.new(api.name, checked, generator.model.max_positions)
        log.info("infill %s: %d prompt tokens, tenant %s, stream %s", fmt.id, len(checked.prompt_ids),
                 checked.tenant, parsed.stream)
        if parsed.n_predict == 0:
            return JSONResponse(fmt.warmup())
        return await api.answer(api.admit(generator, checked), fmt, parsed.stream, request)

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    async def models(self, request: Request) -> Response:
        self.api.authorize(request)
        return JSONResponse({"object": "list", "data": [self.api.model_card()]})

    async def model(self, request: Request) -> Response:
        self.api.authorize(request)
        self.api.check_model(request.path_params["name"])
        return JSONResponse(self.api.model_card())

    async def metrics(self, request: Request) -> Response:
        if self.api.auth.admin_metrics:
            self.api.authorize(request, admin=True)
        return Response(generate_latest(self.api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: Request) -> Response:
        state = self.api.state
        return JSONResponse({"status": state, "model": self.api.name}, status_code=200 if state == "ok" else 503)

    def routes(self) -> list[Route]:
        return [Route("/v1/completions", self.completions, methods=["POST"]),
                Route(INFILL_PATH, self.infill, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{name:path}", self.model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"])]


def _api_error(metrics: VerifierMetrics):
    """The handler of ApiError: counted as a rejection (reason: the field, else the error code or type)."""
    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        metrics.rejected("http", str(exc.status), reason_label(exc.param, exc.code or exc.type))
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if isinstance(exc, Refused):
            headers = {"Retry-After": str(exc.retry_after_s)}
        body = error_body(exc) if request.url.path == INFILL_PATH else exc.body()  # llama.cpp's shape there
        return JSONResponse(body, status_code=exc.status, headers=headers)
    return handle


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                   code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request %s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    err = ApiError(500, f"the server failed: {type(exc).__name__}", "server_error")
    return JSONResponse(err.body(), status_code=500)


def create_app(settings: "VerifierSettings", metrics: VerifierMetrics | None = None,
               auth: ApiAuth | None = None) -> tuple[Starlette, _Api]:
    """The app and its state; `auth` None: `api_auth(settings)`."""
    api = _Api(settings, metrics if metrics is not None else VerifierMetrics.create(),
               auth if auth is not None else api_auth(settings))
    app = Starlette(routes=_Routes(api).routes(), exception_handlers={
        ApiError: _api_error(api.metrics), HTTPException: _http_error, Exception: _internal_error})
    return app, api


class HttpApi:
    """A started HTTP API: `port`, and `stop(grace)` (503 for new requests; generations in flight
    get `grace` seconds, then end with an error event / a 503) returning an Event set once stopped."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, api: _Api, port: int) -> None:
        self._server, self._thread, self._api, self.port = server, thread, api, port

    def serve(self, generator: "Generator") -> None:
        """Generations are taken from now on (the model is loaded)."""
        self._api.generator, self._api.state = generator, "ok"

    def stop(self, grace: float | None) -> threading.Event:
        self._api.state = "stopping"
        done = threading.Event()

        def run() -> None:
            self._api.running.drain(grace or 0.0)
            self._server.config.timeout_graceful_shutdown = 2.0  # the last events of cut streams
            self._server.should_exit = True
            self._thread.join()
            done.set()

        threading.Thread(target=run, name="verifier-http-stop", daemon=True).start()
        return done


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise OSError(f"verifier HTTP address must be bindable, got {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def start_http(settings: "VerifierSettings", startup_timeout_s: float = 10.0,
               metrics: VerifierMetrics | None = None, auth: ApiAuth | None = None,
               tls: ServerTls | None = None) -> HttpApi:
    """Binds settings.host:settings.http_port (0: a free port) and serves in a daemon thread
    (503 for generations until `serve(generator)`). uvicorn's loggers go to the root logger's
    handlers (log_config None), so they follow the process's log format."""
    app, api = create_app(settings, metrics, auth)
    sock = _bind(settings.host, settings.http_port)
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", log_config=None,
                            **(tls.uvicorn_options() if tls is not None else {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="verifier-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise OSError(f"verifier HTTP API must start within {startup_timeout_s} s, got "
                          f"{'an exit' if not thread.is_alive() else 'no start'} (see the log)")
        time.sleep(0.01)
    return HttpApi(server, thread, api, sock.getsockname()[1])
