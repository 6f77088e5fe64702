"""OpenAI request schemas (with vLLM's and AdaServe's extensions), response builders and the
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``.

Schemas are strict (no string-to-number coercion, no NaN/inf) and allow unknown fields, which
are ignored as OpenAI-compatible servers commonly do. Known parameters the engine cannot honour are
rejected with 400 ``unsupported_parameter`` rather than silently ignored (see ``unsupported``).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 16
# Temperatures in (0, MIN_TEMPERATURE) are refused: logits / temperature overflows float64 for
# subnormal values (5e-324) and the distribution becomes NaN; 0.01 already samples the argmax
# with probability ~1 for any realistic logit gap.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body (``headers``: extra response headers, e.g.
    ``Connection: close`` when the rest of the request body is left unread)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "internal_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_validation_error(e: ValidationError) -> ApiError:
    """The first schema problem as a 400, ``param`` = the top-level field (dotted path in the message)."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err.get("loc", ())]
    where = ".".join(loc) if loc else "body"
    param = loc[0] if loc else None
    if err.get("type") == "missing":
        return ApiError(400, f"missing required field '{where}'", param, "missing_required_parameter")
    return ApiError(400, f"invalid value for '{where}': {err.get('msg')}", param, "invalid_value")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # a JSON escape of U+D800..U+DFFF


def check_unicode(raw: bytes, obj: Any) -> None:
    """400 if a string of the parsed body ``obj`` holds a lone surrogate (JSON allows ``"\\ud800"``;
    such a string cannot be encoded, tokenized or echoed back). Only bodies whose ``raw`` text has
    a surrogate escape are walked (iteratively: the nesting depth is up to the client)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    stack: list[tuple[str | None, Any]] = [(None, obj)]
    while stack:
        top, x = stack.pop()
        if isinstance(x, dict):
            stack.extend((top, k) for k in x)  # a top-level key is reported as "the body"
            stack.extend((k if top is None else top, v) for k, v in x.items())
        elif isinstance(x, list):
            stack.extend((top, v) for v in x)
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                where = f"'{top}'" if top is not None else "the body"
                raise ApiError(400, f"{where} holds a lone surrogate (U+{ord(x[e.start]):04X} at character "
                               f"{e.start}): text must be valid Unicode (escaped surrogates come in pairs)",
                               top, "invalid_value") from None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None    # None: the server's --temperature (default 0, greedy)
    top_p: float | None = None
    top_k: int | None = None            # vLLM: -1 or 0 = no limit
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None             # with temperature > 0: reproducible sampling (Gumbel-max per position)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    user: str | None = None
    # vLLM extensions
    ignore_eos: bool | None = None      # None: the server's --ignore-eos
    priority: int = 0
    return_token_ids: bool = False
    # AdaServe: the TPOT SLO (docs/definitions.md §1): absolute ms, or the encoded ratio
    slo_ms: float | None = None
    slo_ratio: float | None = None
    slo_category: str | None = Field(default=None, min_length=1, max_length=64)  # label for /metrics
    slo_ttft_ms: float | None = None    # TTFT SLO in ms (issue 15); none: the category's default

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content part of type {part.type!r} is not supported (text only)",
                               "messages", "unsupported_content")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"'{param}' {why}", param, "unsupported_parameter")


def unsupported(req: SamplingRequest) -> ApiError | None:
    """The first parameter this engine cannot honour (or out of range), as an error; None if all are
    fine. Temperature, top_p, top_k, seed and ignore_eos are per request (``sampling_fields``)."""
    if req.n != 1:
        return _unsupported("n", f"must be 1 (one choice per request), got {req.n}")
    t = req.temperature
    if t is not None and not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        return ApiError(400, f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                        f"got {t!r}", "temperature", "invalid_value")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        return ApiError(400, f"'top_p' must be in (0, 1], got {req.top_p}", "top_p", "invalid_value")
    if req.top_k is not None and req.top_k < -1:
        return ApiError(400, f"'top_k' must be -1 or 0 (no limit) or a positive number of tokens, got {req.top_k}",
                        "top_k", "invalid_value")
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(req, name) != neutral:
            return _unsupported(name, f"must be {neutral:g} (penalties are not implemented)")
    if req.logit_bias:
        return _unsupported("logit_bias", "is not supported")
    if req.min_tokens != 0:
        return _unsupported("min_tokens", "is not supported")
    if req.stream_options is not None and not req.stream:
        return ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                        "invalid_value")
    stops = req.stop_list()
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        return ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings", "stop", "invalid_value")
    return _endpoint_unsupported(req)


def sampling_fields(req: SamplingRequest, default_temperature: float, default_ignore_eos: bool) -> dict[str, Any]:
    """The request's sampling settings (``engine.sequence.SamplingOptions`` fields), absent fields
    taking the server's defaults. Call after ``unsupported`` (values are in range)."""
    return {"temperature": float(default_temperature if req.temperature is None else req.temperature),
            "top_p": 1.0 if req.top_p is None else float(req.top_p),
            "top_k": max(0, req.top_k or 0),
            "seed": req.seed,
            "ignore_eos": bool(default_ignore_eos if req.ignore_eos is None else req.ignore_eos)}


def _endpoint_unsupported(req: SamplingRequest) -> ApiError | None:
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            return _unsupported("best_of", f"must be 1, got {req.best_of}")
        if req.logprobs is not None:
            return _unsupported("logprobs", "is not supported")
        if req.echo:
            return _unsupported("echo", "is not supported")
        if req.suffix is not None:
            return _unsupported("suffix", "is not supported")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            return _unsupported("logprobs", "is not supported")
        if req.tools or req.tool_choice not in (None, "none"):
            return _unsupported("tools", "tool calling is not supported")
        if req.response_format is not None and req.response_format.get("type") != "text":
            return _unsupported("response_format", "only {'type': 'text'} is supported")
    return None


# ------------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None,
                     token_ids: list[int] | None = None) -> dict:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None,
               token_ids: list[int] | None = None) -> dict:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def completion_response(rid: str, created: int, model: str, text: str, finish: str, usage: dict,
                        token_ids: list[int] | None = None) -> dict:
    out = completion_chunk(rid, created, model, text, finish, token_ids)
    out["usage"] = usage
    return out


def chat_response(rid: str, created: int, model: str, text: str, finish: str, usage: dict,
                  token_ids: list[int] | None = None) -> dict:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}
