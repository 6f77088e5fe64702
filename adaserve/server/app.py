"""The OpenAI-compatible HTTP API in front of the engine thread.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

The TPOT SLO of a request (SPEC §2), first match wins: body ``slo_ms`` (absolute ms), body
``slo_ratio`` (the trace encoding: > 0 a multiple of the baseline latency, < 0 absolute ms,
> 999 best effort), header ``x-slo-tpot-ms``; none: best effort. The final usage block reports
``slo_ms``, ``slo_category`` and ``slo_attained``.

Sampling is per request: ``temperature`` (default: the server's ``--temperature``, 0 = greedy),
``top_p``, ``top_k``, ``seed`` (reproducible sampling) and ``ignore_eos`` (default: the server's
``--ignore-eos``) travel with the request to the engine (``TorchExecutor.set_options``), so greedy
and sampled requests share batches.

Errors are OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input, 401 for a missing/wrong API key, 404 for an unknown model or route, 405, 413, 503 when the
engine is down. A client that disconnects has its request cancelled (its KV freed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaserve.core import slo as slo_mod
from adaserve.core.metrics import tpot_ms, ttft_ms
from adaserve.core.request import Phase, Request
from adaserve.engine.sequence import SamplingOptions
from adaserve.server import protocol as P
from adaserve.server.engine_thread import EngineThread, Failed, Finished, Job, Tokens
from adaserve.server.tokenizer import Codec, TextStream

log = logging.getLogger("adaserve.server")

SLO_HEADER = "x-slo-tpot-ms"
MAX_BODY_BYTES = 32 * 2**20
BEST_EFFORT_RATIO = 1000.0  # > 999: no SLO (SPEC §2)


@dataclass
class ServerConfig:
    model_name: str                 # the served model id (/v1/models, the "model" field)
    baseline_ms: float              # for relative SLOs (slo_ratio > 0)
    api_key: str | None = None
    temperature: float = 0.0        # default temperature of requests without one (0: greedy)
    ignore_eos: bool = False        # default ignore_eos of requests without one
    system: str = "adaserve"
    baseline_source: str = ""


# ---------------------------------------------------------------------------------------- helpers

def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else _dumps(obj)}\n\n"


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def resolve_slo(req: P.SamplingRequest, headers: Any, baseline_ms: float) -> tuple[float, float]:
    """``(slo_ratio, slo_ms)`` of a request in SPEC §2's encoding (``slo_ms`` inf: best effort)."""
    if req.slo_ms is not None and req.slo_ratio is not None:
        raise P.ApiError(400, "give either 'slo_ms' or 'slo_ratio', not both", "slo_ms", "invalid_value")
    if req.slo_ms is not None:
        if not req.slo_ms > 0:
            raise P.ApiError(400, f"'slo_ms' must be a positive number of milliseconds, got {req.slo_ms}",
                             "slo_ms", "invalid_value")
        return -float(req.slo_ms), float(req.slo_ms)
    if req.slo_ratio is not None:
        if req.slo_ratio == 0:
            raise P.ApiError(400, "'slo_ratio' must be non-zero: > 0 a multiple of the baseline latency, "
                             "< 0 an absolute TPOT in ms, > 999 no SLO", "slo_ratio", "invalid_value")
        return float(req.slo_ratio), slo_mod.slo_ms(req.slo_ratio, baseline_ms)
    raw = headers.get(SLO_HEADER)
    if raw is None:
        return BEST_EFFORT_RATIO, math.inf
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise P.ApiError(400, f"header '{SLO_HEADER}' must be a positive number of milliseconds, got {raw!r}",
                         SLO_HEADER, "invalid_value")
    return -v, v


def usage(r: Request, generated: int | None = None) -> dict[str, Any]:
    """The usage block; ``generated`` given: a partial one (tokens streamed so far, no SLO verdict).
    The finished request is no longer touched by the engine thread, so its fields are final."""
    n = r.generated if generated is None else generated
    u: dict[str, Any] = {"prompt_tokens": r.input_len, "completion_tokens": n, "total_tokens": r.input_len + n}
    if generated is not None:
        return u
    u.update({"slo_ms": _finite_or_none(r.slo_ms), "slo_category": r.category,
              "slo_attained": bool(r.attained), "ttft_ms": ttft_ms(r), "tpot_ms": tpot_ms(r),
              "decode_latency_ms": r.decode_latency_ms})
    return u


def finish_reason(r: Request, stopped: bool) -> str:
    return "stop" if stopped or r.finish_reason == "eos" else "length"


class SSEResponse(StreamingResponse):
    """Server-sent events that always watch for the client going away: on a disconnect the stream
    is cancelled and the generator closed, whose ``finally`` cancels the engine request."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we were writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


# -------------------------------------------------------------------------------------- the server

class OpenAIServer:
    def __init__(self, engine: EngineThread, codec: Codec, config: ServerConfig):
        self.engine, self.codec, self.cfg = engine, codec, config
        self.metrics = engine.metrics
        self.vocab = engine.executor.model.config.vocab_size

    # ---- request parsing ------------------------------------------------------------------------
    def check_auth(self, request: HttpRequest) -> None:
        if not self.cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            raise P.ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", None,
                             "invalid_api_key", "authentication_error")

    async def json_body(self, request: HttpRequest) -> dict:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise P.ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", None, "body_too_large")
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise P.ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(obj, dict):
            raise P.ApiError(400, "the body must be a JSON object", None, "invalid_json")
        return obj

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model_name:
            raise P.ApiError(404, f"the model '{model}' does not exist; this server serves "
                             f"'{self.cfg.model_name}'", "model", "model_not_found")

    def prompt_ids(self, req: P.CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise P.ApiError(400, f"one prompt per request is supported, got {len(p)}", "prompt",
                                 "unsupported_parameter")
            p = p[0]
        ids = self.codec.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise P.ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})", "prompt",
                             "invalid_value")
        return ids

    def chat_ids(self, req: P.ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return self.codec.chat_ids(messages)
        except Exception as e:  # a template that rejects the conversation (jinja raise_exception, ...)
            raise P.ApiError(400, f"the chat template cannot render these messages: {e}", "messages",
                             "invalid_value") from None

    def max_new_tokens(self, requested: int | None, n_prompt: int, param: str) -> int:
        max_seq = self.engine.max_seq_len
        if n_prompt == 0:
            raise P.ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        if n_prompt >= max_seq:
            raise P.ApiError(400, f"the prompt has {n_prompt} tokens; this model's maximum sequence length is "
                             f"{max_seq} tokens (prompt + output)", "prompt", "context_length_exceeded")
        if requested is None:
            requested = max_seq - n_prompt
        if requested < 1:
            raise P.ApiError(400, f"'{param}' must be >= 1, got {requested}", param, "invalid_value")
        if n_prompt + requested > max_seq:
            raise P.ApiError(400, f"this model's maximum sequence length is {max_seq} tokens; the request "
                             f"asks for {n_prompt + requested} ({n_prompt} in the prompt, {requested} in the "
                             "output)", param, "context_length_exceeded")
        if not self.engine.fits_kv(n_prompt, requested):
            raise P.ApiError(400, f"{n_prompt} prompt + {requested} output tokens do not fit in the KV cache",
                             param, "context_length_exceeded")
        return requested

    def parse(self, cls: type, body: dict):
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise P.from_validation_error(e) from None
        self.check_model(req.model)
        err = P.unsupported(req)
        if err is not None:
            raise err
        return req

    def sampling(self, req: P.SamplingRequest) -> SamplingOptions:
        return SamplingOptions(**P.sampling_fields(req, self.cfg.temperature, self.cfg.ignore_eos))

    # ---- endpoints ------------------------------------------------------------------------------
    async def handle(self, request: HttpRequest, chat: bool):
        self.check_auth(request)
        if not self.engine.alive:
            raise P.ApiError(503, "the engine is not running", None, "engine_unavailable", "server_error")
        body = await self.json_body(request)
        if chat:
            req = self.parse(P.ChatCompletionRequest, body)
            ids = self.chat_ids(req)
            param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        else:
            req = self.parse(P.CompletionRequest, body)
            ids = self.prompt_ids(req)
            param = "max_tokens"
        requested = getattr(req, param)
        max_new = self.max_new_tokens(requested, len(ids), param)
        ratio, slo_ms = resolve_slo(req, request.headers, self.cfg.baseline_ms)
        r = self.engine.new_request(len(ids), max_new, ratio, slo_ms, slo_mod.category_of(ratio, req.slo_category))
        out = Output(self, Job(r, ids, self.sampling(req)), req, chat)  # submitted when the answer starts being consumed
        if req.stream:
            return SSEResponse(out.stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await out.collect(request)


class Output:
    """The answer to one request: consumes the job's events into SSE chunks or one JSON body."""

    def __init__(self, server: OpenAIServer, job: Job, req: P.SamplingRequest, chat: bool):
        self.server, self.engine, self.job, self.req, self.chat = server, server.engine, job, req, chat
        self.id = P.new_id("chatcmpl" if chat else "cmpl")
        self.created = P.now_s()
        self.model = server.cfg.model_name
        self.text = TextStream(server.codec, req.stop_list())
        self.token_ids: list[int] = []
        self.done = False

    async def events(self) -> AsyncIterator[Any]:
        while not self.done:
            ev = await self.job.events.get()
            if isinstance(ev, (Finished, Failed)):
                self.done = True
            elif self.text.stopped:
                continue  # tokens that arrived after a stop string: not part of the answer
            yield ev

    def on_tokens(self, ev: Tokens) -> str:
        self.token_ids.extend(ev.ids)
        delta = self.text.push(ev.ids)
        if self.text.stopped:
            self.engine.cancel(self.job)  # ends with Finished(phase CANCELLED) -> finish_reason "stop"
        return delta

    def _chunk(self, text: str | None, finish: str | None, ids: list[int] | None) -> dict:
        ids = ids if self.req.return_token_ids else None
        if self.chat:
            delta = {} if text is None else {"content": text}
            return P.chat_chunk(self.id, self.created, self.model, delta, finish, ids)
        return P.completion_chunk(self.id, self.created, self.model, text or "", finish, ids)

    async def stream(self) -> AsyncIterator[str]:
        opts = self.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        self.engine.submit(self.job)
        try:
            if self.chat:
                yield sse(P.chat_chunk(self.id, self.created, self.model, {"role": "assistant", "content": ""}, None))
            async for ev in self.events():
                if isinstance(ev, Tokens):
                    chunk = self._chunk(self.on_tokens(ev), None, ev.ids)
                    if continuous:
                        chunk["usage"] = usage(self.job.request, len(self.token_ids))
                    yield sse(chunk)
                elif isinstance(ev, Failed):
                    yield sse(P.error_body(ev.message, "internal_error", None, "engine_failure"))
                elif ev.request.phase == Phase.REJECTED:
                    yield sse(P.error_body(f"the engine rejected the request: {ev.request.finish_reason}",
                                           "invalid_request_error", None, "rejected"))
                else:
                    r = ev.request
                    chunk = self._chunk(self.text.finish() or None, finish_reason(r, self.text.stopped), [])
                    if continuous:
                        chunk["usage"] = usage(r)
                    yield sse(chunk)
                    if include_usage:
                        yield sse({"id": self.id, "object": chunk["object"], "created": self.created,
                                   "model": self.model, "choices": [], "usage": usage(r)})
            yield sse("[DONE]")
        finally:
            if not self.done:  # the client went away (or the stream failed): free the engine's work
                self.engine.cancel(self.job)

    async def collect(self, request: HttpRequest) -> JSONResponse:
        self.engine.submit(self.job)
        consume = asyncio.ensure_future(self._consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not consume.done():
                consume.cancel()
                self.engine.cancel(self.job)
        if not consume.done() or consume.cancelled():
            return JSONResponse(P.error_body("client disconnected", "invalid_request_error"), status_code=499)
        return consume.result()

    async def _consume(self) -> JSONResponse:
        text = []
        async for ev in self.events():
            if isinstance(ev, Tokens):
                text.append(self.on_tokens(ev))
            elif isinstance(ev, Failed):
                raise P.ApiError(500, ev.message, None, "engine_failure")
            elif ev.request.phase == Phase.REJECTED:
                raise P.ApiError(400, f"the engine rejected the request: {ev.request.finish_reason}", None,
                                 "rejected")
            else:
                r = ev.request
                text.append(self.text.finish())
                build = P.chat_response if self.chat else P.completion_response
                ids = self.token_ids if self.req.return_token_ids else None
                return JSONResponse(build(self.id, self.created, self.model, "".join(text),
                                          finish_reason(r, self.text.stopped), usage(r), ids))
        raise P.ApiError(500, "the engine ended the request without an answer")


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------------------- the app

def create_app(engine: EngineThread, codec: Codec, config: ServerConfig) -> FastAPI:
    """The FastAPI app; starting it (lifespan) starts the engine thread, stopping it stops it."""
    server = OpenAIServer(engine, codec, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="AdaServe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_error_handlers(app, server)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await server.handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        server.check_auth(request)
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": P.now_s(), "owned_by": "adaserve",
            "max_model_len": engine.max_seq_len, "root": config.model_name}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise P.ApiError(503, "the engine is not running", None, "engine_unavailable", "server_error")
        return {"status": "ok", **engine.snapshot, "baseline_ms": config.baseline_ms}

    @app.get("/metrics")
    async def metrics():
        info = {"model": config.model_name, "system": config.system, "baseline_ms": config.baseline_ms}
        text = server.metrics.render(engine.snapshot, info)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _add_error_handlers(app: FastAPI, server: OpenAIServer) -> None:
    def reply(status: int, body: dict) -> JSONResponse:
        server.metrics.http_error(status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(P.ApiError)
    async def api_error(request, e: P.ApiError):
        return reply(e.status, e.body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return reply(e.status_code, P.error_body(str(e.detail), "invalid_request_error", None, code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return reply(400, P.error_body(str(e), "invalid_request_error", None, "invalid_value"))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return reply(500, P.error_body(f"internal error: {type(e).__name__}", "internal_error"))
