"""The OpenAI-compatible HTTP API in front of the engine thread.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text).

The TPOT SLO of a request (docs/definitions.md §1), first match wins: body ``slo_ms`` (absolute ms), body
``slo_ratio`` (the trace encoding: > 0 a multiple of the baseline latency, < 0 absolute ms,
> 999 best effort), header ``x-slo-tpot-ms``; none: best effort. The TTFT SLO: body
``slo_ttft_ms``, else header ``x-slo-ttft-ms`` (positive ms); none: the category's default
(``core.request.TTFT_SLO_MS_BY_CATEGORY``). The final usage block reports ``slo_ms``,
``slo_category``, ``slo_attained``, ``slo_ttft_ms`` and ``ttft_attained``.

Sampling is per request: ``temperature`` (default: the server's ``--temperature``, 0 = greedy),
``top_p``, ``top_k``, ``seed`` (reproducible sampling) and ``ignore_eos`` (default: the server's
``--ignore-eos``) travel with the request to the engine (``TorchExecutor.set_options``), so greedy
and sampled requests share batches.

Errors are OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input, 401 for a missing/wrong API key, 404 for an unknown model or route, 405, 408 for a body that
does not arrive within ``body_timeout_s``, 413, 503 when the engine is down. No client mistake is
answered 500. A client that disconnects has its request cancelled (its KV freed) and is counted in
``adaserve_client_disconnects_total``, not as an error.

The event loop never does work proportional to the prompt: bodies are read with a deadline and a
size cap, prompts longer than ``MAX_CHARS_PER_TOKEN`` characters per token of the maximum sequence
length are refused before tokenizing, and tokenization (and parsing of large bodies) runs on a
worker thread, so ``/health`` and every stream keep going while a large prompt is handled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adaserve.core import slo as slo_mod
from adaserve.core.errors import UserError
from adaserve.core.metrics import tpot_ms, ttft_ms
from adaserve.core.request import Phase, Request
from adaserve.engine.sequence import SamplingOptions
from adaserve.server import protocol as P
from adaserve.server.engine_thread import EngineThread, Failed, Finished, Job, Tokens
from adaserve.server.metrics import CONTENT_TYPE, KNOWN_CATEGORIES
from adaserve.server.tokenizer import Codec, TextStream

log = logging.getLogger("adaserve.server")

SLO_HEADER = "x-slo-tpot-ms"
TTFT_SLO_HEADER = "x-slo-ttft-ms"
MAX_BODY_BYTES = 32 * 2**20
BODY_TIMEOUT_S = 30.0
# A prompt is refused before tokenizing when it has more characters than this many per token of
# the maximum sequence length: no real text averages more (English ~4, code ~3 per token), and
# tokenizing a 10 MB prompt takes tens of seconds of CPU.
MAX_CHARS_PER_TOKEN = 16
PARSE_OFF_LOOP_BYTES = 64 * 2**10  # bodies larger than this are parsed on the worker thread
BEST_EFFORT_RATIO = 1000.0  # > 999: no SLO (docs/definitions.md §1)
T = TypeVar("T")


@dataclass
class ServerConfig:
    model_name: str                 # the served model id (/v1/models, the "model" field)
    baseline_ms: float              # for relative SLOs (slo_ratio > 0)
    api_key: str | None = None
    temperature: float = 0.0        # default temperature of requests without one (0: greedy)
    ignore_eos: bool = False        # default ignore_eos of requests without one
    system: str = "adaserve"
    baseline_source: str = ""
    body_timeout_s: float = BODY_TIMEOUT_S  # the whole request body must arrive within this (else 408)
    max_body_bytes: int = MAX_BODY_BYTES    # larger bodies: 413
    categories: tuple[str, ...] = KNOWN_CATEGORIES  # /metrics label values; other categories: "other"

    def __post_init__(self):
        t = self.temperature
        if not (t == 0 or (math.isfinite(t) and t >= P.MIN_TEMPERATURE)):
            raise UserError(f"the default temperature must be 0 (greedy) or at least {P.MIN_TEMPERATURE:g}, "
                            f"got {t!r}")
        if not (math.isfinite(self.body_timeout_s) and self.body_timeout_s > 0):
            raise UserError(f"the body timeout must be a positive number of seconds, got {self.body_timeout_s!r}")
        if self.max_body_bytes < 1:
            raise UserError(f"the body size limit must be positive, got {self.max_body_bytes!r}")


# ---------------------------------------------------------------------------------------- helpers

def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else _dumps(obj)}\n\n"


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def resolve_slo(req: P.SamplingRequest, headers: Any, baseline_ms: float) -> tuple[float, float]:
    """``(slo_ratio, slo_ms)`` in the encoding of docs/definitions.md §1 (inf: best effort)."""
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
    v = header_ms(headers, SLO_HEADER)
    return (BEST_EFFORT_RATIO, math.inf) if v is None else (-v, v)


def header_ms(headers: Any, name: str) -> float | None:
    """A header holding a positive number of milliseconds (None when absent; 400 when invalid)."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise P.ApiError(400, f"header '{name}' must be a positive number of milliseconds, got {raw!r}",
                         name, "invalid_value")
    return v


def resolve_ttft_slo(req: P.SamplingRequest, headers: Any) -> float | None:
    """The TTFT SLO in ms: body ``slo_ttft_ms``, else header ``x-slo-ttft-ms``; None: the
    category's default (``Request.ttft_slo``)."""
    if req.slo_ttft_ms is not None:
        if not req.slo_ttft_ms > 0:
            raise P.ApiError(400, f"'slo_ttft_ms' must be a positive number of milliseconds, got "
                             f"{req.slo_ttft_ms}", "slo_ttft_ms", "invalid_value")
        return float(req.slo_ttft_ms)
    return header_ms(headers, TTFT_SLO_HEADER)


def usage(r: Request, generated: int | None = None) -> dict[str, Any]:
    """The usage block; ``generated`` given: a partial one (tokens streamed so far, no SLO verdict).
    The finished request is no longer touched by the engine thread, so its fields are final."""
    n = r.generated if generated is None else generated
    u: dict[str, Any] = {"prompt_tokens": r.input_len, "completion_tokens": n, "total_tokens": r.input_len + n}
    if generated is not None:
        return u
    u.update({"slo_ms": _finite_or_none(r.slo_ms), "slo_category": r.category,
              "slo_attained": bool(r.attained), "ttft_ms": ttft_ms(r), "tpot_ms": tpot_ms(r),
              "slo_ttft_ms": _finite_or_none(r.ttft_slo), "ttft_attained": bool(r.ttft_attained),
              "decode_latency_ms": r.decode_latency_ms})
    return u


def finish_reason(r: Request, stopped: bool) -> str:
    return "stop" if stopped or r.finish_reason == "eos" else "length"


class SSEResponse(StreamingResponse):
    """Server-sent events that always watch for the client going away: on a disconnect the stream
    is cancelled and the generator closed, whose ``finally`` cancels the engine request."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], *, headers: dict[str, str] | None = None,
                 on_disconnect: Callable[[], None] | None = None):
        super().__init__(content, headers=headers)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        complete = False
        try:
            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    nonlocal complete
                    try:
                        await self.stream_response(send)
                        complete = True
                    except OSError:  # the client went away while we were writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        except Exception:
            complete = True  # the stream failed: not the client's doing
            raise
        finally:
            await self.body_iterator.aclose()
            if not complete and self.on_disconnect is not None:
                self.on_disconnect()


# -------------------------------------------------------------------------------------- the server

class OpenAIServer:
    def __init__(self, engine: EngineThread, codec: Codec, config: ServerConfig):
        self.engine, self.codec, self.cfg = engine, codec, config
        self.metrics = engine.metrics
        self.vocab = engine.executor.model.config.vocab_size
        # tokenization and large-body parsing: off the event loop, one at a time (a Hugging Face
        # tokenizer is not meant to be called from several threads at once)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="adaserve-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def model_card(self) -> dict[str, Any]:
        name = self.cfg.model_name
        return {"id": name, "object": "model", "created": P.now_s(), "owned_by": "adaserve",
                "max_model_len": self.engine.max_seq_len, "root": name}

    # ---- request parsing ------------------------------------------------------------------------
    def check_auth(self, request: HttpRequest) -> None:
        if not self.cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            raise P.ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", None,
                             "invalid_api_key", "authentication_error")

    async def read_body(self, request: HttpRequest) -> bytes:
        """The body, refused with 413 past ``max_body_bytes`` (before reading it when the client
        declares its length) and with 408 when it has not all arrived after ``body_timeout_s``.
        A client that goes away meanwhile raises ``ClientDisconnect`` (counted, not an error)."""
        limit, timeout = self.cfg.max_body_bytes, self.cfg.body_timeout_s
        too_large = P.ApiError(413, f"the request body is larger than the limit of {limit} bytes", None,
                               "body_too_large", headers={"Connection": "close"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            with anyio.fail_after(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise P.ApiError(408, f"the request body did not arrive within {timeout:g} s ({size} bytes received)",
                             None, "request_timeout", headers={"Connection": "close"}) from None
        return b"".join(chunks)

    async def json_body(self, request: HttpRequest) -> dict:
        body = await self.read_body(request)
        try:
            obj = await self.off_loop(json.loads, body) if len(body) > PARSE_OFF_LOOP_BYTES else json.loads(body)
        except (ValueError, RecursionError) as e:
            raise P.ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(obj, dict):
            raise P.ApiError(400, "the body must be a JSON object", None, "invalid_json")
        P.check_unicode(body, obj)
        return obj

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model_name:
            raise P.ApiError(404, f"the model '{model}' does not exist; this server serves "
                             f"'{self.cfg.model_name}'", "model", "model_not_found")

    @property
    def max_prompt_chars(self) -> int:
        return self.engine.max_seq_len * MAX_CHARS_PER_TOKEN

    def check_prompt_size(self, n: int, unit: str) -> None:
        """Refuse a prompt that cannot fit before any work proportional to its size is done."""
        max_seq = self.engine.max_seq_len
        limit = self.max_prompt_chars if unit == "characters" else max_seq - 1
        if n > limit:
            why = (f"at most {limit} characters are accepted ({MAX_CHARS_PER_TOKEN} per token of the maximum "
                   f"sequence length, {max_seq} tokens)") if unit == "characters" else \
                f"this model's maximum sequence length is {max_seq} tokens (prompt + output)"
            raise P.ApiError(400, f"the prompt has {n} {unit}; {why}", "prompt", "context_length_exceeded")

    def single_prompt(self, req: P.CompletionRequest) -> str | list[int]:
        """The request's one prompt (a string or token ids), size-checked."""
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise P.ApiError(400, f"one prompt per request is supported, got {len(p)}", "prompt",
                                 "unsupported_parameter")
            p = p[0]
        self.check_prompt_size(len(p), "characters" if isinstance(p, str) else "tokens")
        return p

    def prompt_ids(self, p: str | list[int]) -> list[int]:
        """Token ids of a prompt (on the worker thread: tokenizing is proportional to its size)."""
        ids = self.codec.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise P.ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})", "prompt",
                             "invalid_value")
        return ids

    def chat_messages(self, req: P.ChatCompletionRequest) -> list[dict[str, str]]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self.check_prompt_size(sum(len(m["content"]) for m in messages), "characters")
        return messages

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the chat template (on the worker thread)."""
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
            ids = await self.off_loop(self.chat_ids, self.chat_messages(req))
            param = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        else:
            req = self.parse(P.CompletionRequest, body)
            ids = await self.off_loop(self.prompt_ids, self.single_prompt(req))
            param = "max_tokens"
        requested = getattr(req, param)
        max_new = self.max_new_tokens(requested, len(ids), param)
        ratio, slo_ms = resolve_slo(req, request.headers, self.cfg.baseline_ms)
        ttft_slo = resolve_ttft_slo(req, request.headers)
        r = self.engine.new_request(len(ids), max_new, ratio, slo_ms, slo_mod.category_of(ratio, req.slo_category))
        r.slo_ttft_ms = ttft_slo
        out = Output(self, Job(r, ids, self.sampling(req)), req, chat)  # submitted when the answer starts being consumed
        if req.stream:
            return SSEResponse(out.stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                               on_disconnect=lambda: self.metrics.client_disconnect("stream"))
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
            self.server.metrics.client_disconnect("response")
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
    info = {"model": config.model_name, "system": config.system, "baseline_ms": config.baseline_ms}
    server.metrics.bind(lambda: engine.snapshot, info, config.categories)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            server.worker.shutdown(wait=False, cancel_futures=True)

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
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HttpRequest):
        server.check_auth(request)
        server.check_model(model_id)
        return server.model_card()

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise P.ApiError(503, "the engine is not running", None, "engine_unavailable", "server_error")
        return {"status": "ok", **engine.snapshot, "baseline_ms": config.baseline_ms}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI, server: OpenAIServer) -> None:
    def reply(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        server.metrics.http_error(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(P.ApiError)
    async def api_error(request, e: P.ApiError):
        return reply(e.status, e.body(), e.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, e: ClientDisconnect):
        # the client closed the connection while sending its body: nobody reads this answer, it
        # is no error of ours (no traceback, not a 5xx), and it is counted as what it is
        server.metrics.client_disconnect("body")
        return Response(status_code=499)

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
