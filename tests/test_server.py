"""The OpenAI-compatible server on loopback (uvicorn in a thread, a tiny random Llama with the n-gram
drafter) driven by a real HTTP client: completions and chat, SSE streaming, SLO fields, /metrics,
64 concurrent streams, the bad-input table, API keys, cancellation on disconnect (KV freed), and
the HTTP benchmark client writing result files, per-request sampling (greedy and sampled requests
in one batch), no per-request state left behind. One test starts `adaserve serve` as a process."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from adaserve.cli import main as cli_main
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.core.results import load_result, result_complete
from adaserve.engine import NgramDrafter, TorchExecutor, tiny_random_model
from adaserve.engine.loader import resolve_model
from adaserve.engine.tokenizer import ByteTokenizer
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy
from adaserve.server import EngineThread, ServerConfig, create_app
from adaserve.server.metrics import parse_prometheus
from adaserve.server.build import codec_for
from adaserve.server.tokenizer import IncrementalDetokenizer, TextStream

from engine_util import free_port, wait_for_server

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINE_MS = 2.0
MAX_SEQ = 256
MODEL = "tiny"
PROFILE = {"name": "tiny", "baseline_ms": BASELINE_MS, "source": "test",
           "limits": {"max_batch_requests": 16, "max_batch_tokens": 256, "prefill_chunk": 64, "max_seq_len": MAX_SEQ},
           "verify": {"tokens": [1, 8, 256], "ms": [1.0, 1.2, 8.0]},
           "draft": {"tokens": [1, 128], "ms": [0.2, 1.0]}}


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        # proto=IPPROTO_TCP: asyncio then sets TCP_NODELAY on the connections (else 40 ms delayed-ACK stalls)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def make_engine(seed=1, **executor_kw):
    model = tiny_random_model("llama", seed=seed)
    profile = LatencyProfile.from_dict(PROFILE)
    ex = TorchExecutor(model, profile, NgramDrafter(), **executor_kw)
    return model, ex, EngineThread(make_policy("adaserve", "llama"), ex)


@pytest.fixture(scope="module")
def srv():
    model, ex, engine = make_engine(ignore_eos=True)
    codec = ByteTokenizer()
    app = create_app(engine, codec, ServerConfig(MODEL, BASELINE_MS, ignore_eos=True))
    live = LiveServer(app)
    live.model, live.ex, live.engine, live.codec = model, ex, engine, codec
    live.client = httpx.Client(base_url=live.url, timeout=60)
    yield live
    live.client.close()
    live.stop()


@pytest.fixture(scope="module")
def keyed():
    """A second server: API key, EOS respected (so per-request ignore_eos is refused)."""
    _, ex, engine = make_engine(seed=3)
    live = LiveServer(create_app(engine, ByteTokenizer(), ServerConfig(MODEL, BASELINE_MS, api_key="sekret")))
    yield live
    live.stop()


def sse_payloads(raw: str) -> list[str]:
    """The data of every event; asserts the framing (``data: ...`` events separated by blank lines)."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    return [e[len("data: "):] for e in events]


def stream(client: httpx.Client, path: str, body: dict, headers=None) -> list:
    with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.read().decode())
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def metrics(client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_prometheus(r.text)


def wait_idle(srv, timeout=10.0) -> dict:
    """Until no request is running or waiting and every KV block is back; then the executor holds
    nothing for any request (the server forgets each one when it ends)."""
    deadline = time.time() + timeout
    while True:
        m = metrics(srv.client)
        if m["adaserve_num_requests_running"] == 0 and m["adaserve_num_requests_waiting"] == 0 \
                and m["adaserve_kv_blocks_in_use"] == 0:
            assert_no_request_state(srv.ex)
            return m
        assert time.time() < deadline, f"engine not idle: {m}"
        time.sleep(0.02)


def assert_no_request_state(ex):
    assert ex.state_size() == {"seqs": 0, "outputs": 0, "prompts": 0, "options": 0, "kv_sequences": 0}
    assert not ex.drafter._index  # the n-gram drafter's per-request index


@contextmanager
def slow_engine(ex, delay_s=0.02):
    """Every engine step takes at least ``delay_s`` (so a stream outlives its client)."""
    real = ex.execute

    def slow(*args, **kw):
        time.sleep(delay_s)
        return real(*args, **kw)
    ex.execute = slow
    try:
        yield
    finally:
        del ex.execute


def engine_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding by the engine itself (no drafter, incremental decoding)."""
    ex = TorchExecutor(model, LatencyProfile.from_dict(PROFILE), None, ignore_eos=True)
    ex.set_prompts({0: prompt})
    r = Request(0, 0.0, len(prompt), n, 1000.0, math.inf, "x")
    ServingLoop(make_policy("vllm", "llama"), ex, [r]).run()
    return ex.outputs[0]


# ---- completions, chat, streaming --------------------------------------------------------------

def test_models_and_health(srv):
    models = srv.client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == MAX_SEQ
    h = srv.client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["kv_blocks_in_use"] == 0


def test_greedy_output_equals_the_engines_and_streaming_equals_non_streaming(srv):
    prompt = [5, 9, 33, 5, 9, 33, 5, 9, 70, 71, 72, 5, 9]
    ref = engine_greedy(srv.model, prompt, 40)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "return_token_ids": True}
    r = srv.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["token_ids"] == ref and choice["finish_reason"] == "length"
    assert choice["text"] == srv.codec.decode(ref)
    assert out["usage"]["prompt_tokens"] == len(prompt) and out["usage"]["completion_tokens"] == 40
    chunks = stream(srv.client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert sum((c["choices"][0]["token_ids"] for c in chunks if c["choices"]), []) == ref
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    # a text prompt tokenizes to the same ids
    text = srv.codec.decode(prompt)
    assert srv.codec.encode(text) == prompt
    r2 = srv.client.post("/v1/completions", json={**body, "prompt": text}).json()
    assert r2["choices"][0]["token_ids"] == ref


def test_streaming_chunks_usage_and_slo_report(srv):
    chunks = stream(srv.client, "/v1/completions",
                    {"prompt": "stream me", "max_tokens": 12, "slo_ratio": 1.2,
                     "stream_options": {"include_usage": True}})
    *body, last = chunks
    assert all(c["object"] == "text_completion" and c["id"] == last["id"] for c in chunks)
    assert all(len(c["choices"]) == 1 for c in body)
    assert [c["choices"][0]["finish_reason"] for c in body][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert last["choices"] == []
    u = last["usage"]
    assert u["completion_tokens"] == 12 and u["prompt_tokens"] == len("stream me")
    assert u["total_tokens"] == u["prompt_tokens"] + 12
    assert u["slo_ms"] == pytest.approx(1.2 * BASELINE_MS) and u["slo_category"] == "coding"
    assert isinstance(u["slo_attained"], bool) and u["ttft_ms"] >= 0
    # without include_usage: no usage chunk
    chunks = stream(srv.client, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


def test_continuous_usage_counts_every_token(srv):
    chunks = stream(srv.client, "/v1/completions", {"prompt": [3, 4, 5, 3, 4, 5, 3, 4], "max_tokens": 30,
                                                    "return_token_ids": True,
                                                    "stream_options": {"include_usage": True,
                                                                       "continuous_usage_stats": True}})
    seen = 0
    for c in chunks[:-1]:
        seen += len(c["choices"][0]["token_ids"])
        assert c["usage"]["completion_tokens"] == seen
    assert seen == 30


def test_chat_completion(srv):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = srv.client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 10,
                                                      "return_token_ids": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == srv.codec.decode(out["choices"][0]["token_ids"])
    flat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert out["usage"]["prompt_tokens"] == len(srv.codec.chat_ids(flat))
    chunks = stream(srv.client, "/v1/chat/completions", {"messages": messages, "max_tokens": 10,
                                                         "stream_options": {"include_usage": True},
                                                         "max_completion_tokens": 10})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == msg["content"]  # greedy: the same answer
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("body, headers, slo_ms, category", [
    ({"slo_ratio": 1.2}, {}, 1.2 * BASELINE_MS, "coding"),
    ({"slo_ratio": -50}, {}, 50.0, "chat"),
    ({"slo_ms": 150}, {}, 150.0, "summarization"),
    ({"slo_ms": 40.5}, {"x-slo-tpot-ms": "10"}, 40.5, "slo-40.5"),  # the body wins over the header
    ({}, {"x-slo-tpot-ms": "50"}, 50.0, "chat"),
    ({"slo_ratio": 1000}, {}, None, "best_effort"),
    ({"priority": -3}, {}, None, "best_effort"),  # vLLM's priority is accepted
])
def test_slo_fields(srv, body, headers, slo_ms, category):
    r = srv.client.post("/v1/completions", json={"prompt": "slo", "max_tokens": 4, **body}, headers=headers)
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["slo_category"] == category
    assert u["slo_ms"] == (None if slo_ms is None else pytest.approx(slo_ms))
    if slo_ms is None:
        assert u["slo_attained"] is True
    else:  # docs/definitions.md §3: attained iff decode latency <= slo_ms * decode length
        assert u["slo_attained"] == (u["decode_latency_ms"] <= slo_ms * u["completion_tokens"])


def test_stop_strings(srv):
    prompt = [40, 41, 42, 40, 41, 43]
    ref = srv.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 60}).json()["choices"][0]["text"]
    stop = next(ref[i:i + 2] for i in range(3, len(ref) - 2) if "\ufffd" not in ref[i:i + 2])
    want = ref[:ref.find(stop)]
    body = {"prompt": prompt, "max_tokens": 60, "stop": [stop, "\x00never"]}
    out = srv.client.post("/v1/completions", json=body).json()
    assert out["choices"][0]["text"] == want and out["choices"][0]["finish_reason"] == "stop"
    chunks = stream(srv.client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    wait_idle(srv)  # the stopped request was cancelled in the engine


def test_metrics_exposition(srv):
    srv.client.post("/v1/completions", json={"prompt": "m", "max_tokens": 5, "slo_ratio": 1.2})
    text = srv.client.get("/metrics").text
    for name in ("adaserve_slo_attainment", "adaserve_time_to_first_token_seconds",
                 "adaserve_time_per_output_token_seconds", "adaserve_mean_generated_tokens_per_step",
                 "adaserve_num_requests_running", "adaserve_num_requests_waiting", "adaserve_kv_blocks_in_use"):
        assert f"# TYPE {name} " in text
    m = parse_prometheus(text)
    att = m['adaserve_slo_attainment{category="coding"}']
    assert 0 <= att <= 1
    done = m['adaserve_requests_finished_total{category="coding"}']
    assert att == pytest.approx(m['adaserve_requests_attained_total{category="coding"}'] / done)
    assert m['adaserve_time_to_first_token_seconds_bucket{category="coding",le="+Inf"}'] == done
    assert m['adaserve_time_to_first_token_seconds_count{category="coding"}'] == done
    assert m["adaserve_mean_generated_tokens_per_step"] >= 1.0
    assert m["adaserve_kv_blocks_total"] == srv.ex.num_blocks


# ---- load and cancellation ---------------------------------------------------------------------

async def _one_stream(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
    chat = i % 4 == 3
    n = 8 + i % 17
    body = {"max_tokens": n, "stream": True, "stream_options": {"include_usage": True},
            "slo_ratio": (1.2, -50, -150)[i % 3]}
    if chat:
        body["messages"] = [{"role": "user", "content": f"question {i}"}]
    else:
        body["prompt"] = f"prompt {i} " * (1 + i % 5)
    async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
        raw = (await r.aread()).decode()
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    return r.status_code, json.loads(payloads[-2])["usage"]["completion_tokens"] - n


def test_64_concurrent_streams(srv):
    async def run():
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(_one_stream(c, i) for i in range(64)))
    before = metrics(srv.client)
    results = asyncio.run(run())
    assert results == [(200, 0)] * 64
    m = wait_idle(srv)
    finished = sum(v for k, v in m.items() if k.startswith("adaserve_requests_finished_total"))
    assert finished - sum(v for k, v in before.items() if k.startswith("adaserve_requests_finished_total")) == 64


def _cancelled(m):
    return sum(v for k, v in m.items() if k.startswith("adaserve_requests_ended_total") and 'outcome="cancelled"' in k)


def test_disconnected_stream_is_cancelled_and_frees_kv(srv):
    before = _cancelled(metrics(srv.client))
    with slow_engine(srv.ex):
        with srv.client.stream("POST", "/v1/completions",
                               json={"prompt": "long " * 8, "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert metrics(srv.client)["adaserve_kv_blocks_in_use"] > 0
        # leaving the block closes the connection mid-stream
        m = wait_idle(srv)
    assert _cancelled(m) == before + 1
    assert m["adaserve_kv_blocks_in_use"] == 0 and srv.ex.cache.alloc.free_blocks == srv.engine.initial_free_blocks


def test_disconnected_non_streaming_request_is_cancelled(srv):
    before = _cancelled(metrics(srv.client))
    with slow_engine(srv.ex):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json={"prompt": "wait", "max_tokens": 200}, timeout=0.4)
        m = wait_idle(srv)
    assert _cancelled(m) == before + 1


def test_engine_failure_fails_its_requests_and_the_server_recovers(srv):
    real = srv.ex.execute

    def broken(*args, **kw):
        raise RuntimeError("simulated device error")
    srv.ex.execute = broken
    try:
        body = {"prompt": "boom", "max_tokens": 5, "stream": True}
        with srv.client.stream("POST", "/v1/completions", json=body) as r:
            payloads = sse_payloads(r.read().decode())
        assert payloads[-1] == "[DONE]" and "simulated device error" in json.loads(payloads[-2])["error"]["message"]
        r = srv.client.post("/v1/completions", json={"prompt": "boom", "max_tokens": 5})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_failure"
    finally:
        del srv.ex.execute
    assert srv.ex.execute.__func__ is real.__func__
    m = wait_idle(srv)
    assert m["adaserve_engine_failures_total"] >= 2
    ok = srv.client.post("/v1/completions", json={"prompt": "fine again", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


# ---- bad input ---------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body: dict or raw text, headers, status, param, code)
    (C, "{not json", {}, 400, None, "invalid_json"),
    (C, "[1, 2]", {}, 400, None, "invalid_json"),
    (C, '{"prompt": "x", "slo_ms": NaN}', {}, 400, "slo_ms", "invalid_value"),
    (C, {"model": "gpt-4", "prompt": "x"}, {}, 404, "model", "model_not_found"),
    (C, {"max_tokens": 4}, {}, 400, "prompt", "missing_required_parameter"),
    (C, {"prompt": ""}, {}, 400, "prompt", "invalid_value"),
    (C, {"prompt": 5}, {}, 400, "prompt", "invalid_value"),
    (C, {"prompt": [1, 999]}, {}, 400, "prompt", "invalid_value"),
    (C, {"prompt": ["a", "b"]}, {}, 400, "prompt", "unsupported_parameter"),
    (C, {"prompt": "x" * 300}, {}, 400, "prompt", "context_length_exceeded"),
    (C, {"prompt": "x", "max_tokens": 0}, {}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": -1}, {}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": "5"}, {}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": 2.5}, {}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": MAX_SEQ}, {}, 400, "max_tokens", "context_length_exceeded"),
    (C, {"prompt": "x", "slo_ms": "fast"}, {}, 400, "slo_ms", "invalid_value"),
    (C, {"prompt": "x", "slo_ms": -5}, {}, 400, "slo_ms", "invalid_value"),
    (C, {"prompt": "x", "slo_ms": 0}, {}, 400, "slo_ms", "invalid_value"),
    (C, {"prompt": "x", "slo_ms": True}, {}, 400, "slo_ms", "invalid_value"),
    (C, {"prompt": "x", "slo_ratio": 0}, {}, 400, "slo_ratio", "invalid_value"),
    (C, {"prompt": "x", "slo_ratio": "1.2"}, {}, 400, "slo_ratio", "invalid_value"),
    (C, {"prompt": "x", "slo_ratio": 1.2, "slo_ms": 30}, {}, 400, "slo_ms", "invalid_value"),
    (C, {"prompt": "x"}, {"x-slo-tpot-ms": "abc"}, 400, "x-slo-tpot-ms", "invalid_value"),
    (C, {"prompt": "x"}, {"x-slo-tpot-ms": "-3"}, 400, "x-slo-tpot-ms", "invalid_value"),
    (C, {"prompt": "x"}, {"x-slo-tpot-ms": "inf"}, 400, "x-slo-tpot-ms", "invalid_value"),
    (C, {"prompt": "x", "priority": "high"}, {}, 400, "priority", "invalid_value"),
    (C, {"prompt": "x", "n": 2}, {}, 400, "n", "unsupported_parameter"),
    (C, {"prompt": "x", "best_of": 3}, {}, 400, "best_of", "unsupported_parameter"),
    (C, {"prompt": "x", "logprobs": 1}, {}, 400, "logprobs", "unsupported_parameter"),
    (C, {"prompt": "x", "echo": True}, {}, 400, "echo", "unsupported_parameter"),
    (C, {"prompt": "x", "temperature": 5}, {}, 400, "temperature", "invalid_value"),
    (C, {"prompt": "x", "temperature": -0.1}, {}, 400, "temperature", "invalid_value"),
    (C, {"prompt": "x", "temperature": 5e-324}, {}, 400, "temperature", "invalid_value"),
    (C, {"prompt": "x", "temperature": 0.001}, {}, 400, "temperature", "invalid_value"),
    (C, '{"prompt": "a\\ud800"}', {}, 400, "prompt", "invalid_value"),
    (CH, '{"messages": [{"role": "user", "content": "\\udfff"}]}', {}, 400, "messages", "invalid_value"),
    (C, {"prompt": "x", "top_p": 0}, {}, 400, "top_p", "invalid_value"),
    (C, {"prompt": "x", "top_p": 1.5}, {}, 400, "top_p", "invalid_value"),
    (C, {"prompt": "x", "top_k": -2}, {}, 400, "top_k", "invalid_value"),
    (C, {"prompt": "x", "seed": 1.5}, {}, 400, "seed", "invalid_value"),
    (C, {"prompt": "x", "ignore_eos": "yes"}, {}, 400, "ignore_eos", "invalid_value"),
    (C, {"prompt": "x", "min_tokens": 3}, {}, 400, "min_tokens", "unsupported_parameter"),
    (C, {"prompt": "x", "logit_bias": {"5": 1.0}}, {}, 400, "logit_bias", "unsupported_parameter"),
    (C, {"prompt": "x", "presence_penalty": 1}, {}, 400, "presence_penalty", "unsupported_parameter"),
    (C, {"prompt": "x", "stream": "yes"}, {}, 400, "stream", "invalid_value"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, {}, 400, "stream_options", "invalid_value"),
    (C, {"prompt": "x", "stop": ["s"] * 20}, {}, 400, "stop", "invalid_value"),
    (CH, {}, {}, 400, "messages", "missing_required_parameter"),
    (CH, {"messages": []}, {}, 400, "messages", "invalid_value"),
    (CH, {"messages": [{"role": "robot", "content": "x"}]}, {}, 400, "messages", "invalid_value"),
    (CH, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}, {},
     400, "messages", "unsupported_content"),
    (CH, {"messages": MSG, "max_completion_tokens": 0}, {}, 400, "max_completion_tokens", "invalid_value"),
    (CH, {"messages": MSG, "logprobs": True}, {}, 400, "logprobs", "unsupported_parameter"),
    (CH, {"messages": MSG, "tools": [{"type": "function"}]}, {}, 400, "tools", "unsupported_parameter"),
    (CH, {"messages": [{"role": "user", "content": "x" * 300}]}, {}, 400, "prompt", "context_length_exceeded"),
]


def _server_errors(m) -> float:
    return sum(v for k, v in m.items() if k.startswith('adaserve_http_errors_total{status="5'))


def test_bad_input_table(srv):
    before = metrics(srv.client)
    for path, body, headers, status, param, code in BAD:
        kw = {"content": body, "headers": {"content-type": "application/json", **headers}} if isinstance(body, str) \
            else {"json": body, "headers": headers}
        r = srv.client.post(path, **kw)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), (body, err)
    for method, path, status in (("GET", C, 405), ("POST", "/v1/nothing", 404), ("GET", "/nope", 404)):
        r = srv.client.request(method, path)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"
    # the server is fine afterwards
    assert srv.client.get("/health").json()["status"] == "ok"
    ok = srv.client.post(C, json={"prompt": "still alive", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    m = metrics(srv.client)
    n400 = sum(s == 400 for _, _, _, s, _, _ in BAD)
    key = 'adaserve_http_errors_total{status="400"}'
    assert m[key] - before.get(key, 0) == n400
    assert _server_errors(m) == _server_errors(before)  # never a 5xx
    wait_idle(srv)


# ---- API key, EOS, the CLI -----------------------------------------------------------------------

def test_api_key(keyed):
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = httpx.post(f"{keyed.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    auth = {"Authorization": "Bearer sekret"}
    assert httpx.post(f"{keyed.url}/v1/completions", json=body, headers=auth).status_code == 200
    assert httpx.get(f"{keyed.url}/v1/models", headers=auth).status_code == 200
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # health and metrics stay open


def test_ignore_eos_per_request(keyed):
    """The keyed server respects EOS by default; a request may ask to ignore it (it is then never
    cut short)."""
    auth = {"Authorization": "Bearer sekret"}
    body = {"prompt": [5, 6, 7], "max_tokens": 60, "return_token_ids": True}
    r = httpx.post(f"{keyed.url}/v1/completions", json={**body, "ignore_eos": True}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_sampling_is_per_request_and_greedy_requests_stay_greedy():
    """A server whose default is temperature 1: requests without a temperature are sampled, requests
    with temperature 0 are greedy (token-identical to the engine's plain greedy decoding) even when
    they share batches with sampled ones, a seed makes a sampled answer reproducible, top_k 1 is
    greedy, and every request's options are forgotten afterwards."""
    model, ex, engine = make_engine(seed=4, temperature=1.0, ignore_eos=True)
    live = LiveServer(create_app(engine, ByteTokenizer(), ServerConfig(MODEL, BASELINE_MS, temperature=1.0,
                                                                       ignore_eos=True)))
    prompt = [7, 8, 9, 7, 8, 9, 7]
    ref = engine_greedy(model, prompt, 24)
    steps = []  # the (rid, temperature) pairs of every decode step's batch
    real = ex.execute

    def spy(prefill, decode, *args, **kw):  # slow steps, so that the requests share batches
        steps.append({(r.rid, ex.seqs[r.rid].options.temperature) for r in decode})
        time.sleep(0.005)
        return real(prefill, decode, *args, **kw)
    ex.execute = spy

    async def many():
        body = {"prompt": prompt, "max_tokens": 24, "return_token_ids": True}
        extras = [{}, {"temperature": 0}, {"temperature": 1.0}, {"temperature": 0}, {"temperature": 0.7, "top_p": 0.9},
                  {"seed": 11}, {"seed": 11, "temperature": 1.0}, {"top_k": 1}, {"temperature": 1.5, "top_k": 5}]
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={**body, **e}) for e in extras))
        return extras, rs
    try:
        extras, rs = asyncio.run(many())
        assert [r.status_code for r in rs] == [200] * len(rs), [r.text for r in rs]
        toks = [r.json()["choices"][0]["token_ids"] for r in rs]
        for e, t in zip(extras, toks):
            if e.get("temperature") == 0 or e.get("top_k") == 1:
                assert t == ref, e
        assert toks[5] == toks[6]  # same seed, same answer (default temperature 1 = explicit 1)
        sampled = [t for e, t in zip(extras, toks) if e.get("temperature", 1.0) > 0 and e.get("top_k") != 1]
        assert any(t != ref for t in sampled)  # sampled, not greedy
        assert any(len({temp for _, temp in s}) > 1 for s in steps)  # greedy and sampled in one batch
        # the seeded answer does not depend on the batch it was served in
        alone = httpx.post(f"{live.url}/v1/completions", json={"prompt": prompt, "max_tokens": 24, "seed": 11,
                                                               "return_token_ids": True}, timeout=60)
        assert alone.json()["choices"][0]["token_ids"] == toks[5]
        live.ex = ex
        live.client = httpx.Client(base_url=live.url, timeout=60)
        wait_idle(live)
        live.client.close()
    finally:
        del ex.execute
        live.stop()


def write_trace(path: Path, n: int, too_long: int | None = None) -> None:
    recs = []
    for i in range(n):
        prompt = "x" * 400 if i == too_long else f"request number {i}: " + "abc " * (i % 7)
        recs.append({"emission_time_ms": 15.0 * i, "input_length": len(prompt), "output_length": 6 + i % 9,
                     "prompt": prompt, "slo_ratio": (1.2, -50.0, -150.0)[i % 3]})
    path.write_text(json.dumps(recs))


def test_bench_client_writes_results(srv, tmp_path):
    trace = tmp_path / "trace.json"
    write_trace(trace, 24, too_long=5)
    out = tmp_path / "res" / "http_bench"
    rc = cli_main(["bench", "--endpoint", srv.url + "/v1", "--trace", str(trace), "--baseline-ms", str(BASELINE_MS),
                   "--out", str(out), "--no-progress"])
    assert rc == 0 and result_complete(out)
    doc = load_result(out)
    s = doc["summary"]
    assert (s["registered"], s["completed"], s["failed"]) == (24, 23, 1)
    assert list(s["rejected_reasons"]) and next(iter(s["rejected_reasons"])).startswith("failed: HTTP 400")
    assert doc["meta"]["failed"] == 1 and doc["meta"]["model"] == MODEL and doc["meta"]["ignore_eos"] is True
    assert doc["meta"]["server_baseline_ms"] == BASELINE_MS
    assert set(s["per_category"]) == {"coding", "chat", "summarization"}
    v = s["vllm"]
    for key in ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms"):
        assert key in v
    assert v["completed"] == 23 and v["total_output_tokens"] == sum(6 + i % 9 for i in range(24) if i != 5)
    assert s["mean_generated_tokens_per_step"] >= 1.0 and s["slo_attainment"] is not None
    recs = {r["rid"]: r for r in doc["requests"]}
    assert recs[5]["phase"] == "rejected" and recs[0]["generated"] == 6 and recs[0]["ttft_ms"] >= 0
    assert recs[0]["slo_ms"] == pytest.approx(1.2 * BASELINE_MS)
    text = Path(f"{out}.txt").read_text()
    assert " total_requests( 23/24)" in text and " goodput(" in text


def test_bench_client_scales_slos_and_caps_outputs(srv, tmp_path):
    trace = tmp_path / "trace.json"
    write_trace(trace, 12)
    out = tmp_path / "scaled"
    rc = cli_main(["bench", "--endpoint", srv.url, "--trace", str(trace), "--baseline-ms", "3", "--out", str(out),
                   "--scale-slos", "--output-len-cap", "4", "--time-scale", "0.5", "--max-requests", "6",
                   "--no-progress"])
    doc = load_result(out)
    assert rc == 0 and doc["summary"]["completed"] == 6 and doc["meta"]["scale_slos"] is True
    recs = doc["requests"]
    assert all(r["generated"] == 4 for r in recs)
    chat = next(r for r in recs if r["category"] == "chat")
    assert chat["slo_ms"] == pytest.approx(50 * 3 / 30)
    # the server labelled the requests with the client's categories (slo_category)
    assert 'adaserve_requests_finished_total{category="summarization"}' in metrics(srv.client)


def test_bench_client_drops_ignore_eos_when_refused(keyed, tmp_path, monkeypatch):
    from adaserve.server import protocol as P

    server = keyed.server.config.app.state.server
    real = server.parse

    def refusing(cls, body):  # a server without vLLM's ignore_eos extension
        if "ignore_eos" in body:
            raise P.ApiError(400, "'ignore_eos' is not supported", "ignore_eos", "unsupported_parameter")
        return real(cls, body)
    monkeypatch.setattr(server, "parse", refusing)
    trace = tmp_path / "t.json"
    write_trace(trace, 3)
    rc = cli_main(["bench", "--endpoint", keyed.url, "--trace", str(trace), "--baseline-ms", "5", "--out",
                   str(tmp_path / "r"), "--api-key", "sekret", "--model", MODEL, "--no-progress"])
    doc = load_result(tmp_path / "r")
    assert rc == 0 and doc["summary"]["completed"] == 3 and doc["meta"]["ignore_eos"] is False


def test_bench_cli_errors(tmp_path):
    assert cli_main(["bench", "--endpoint", "http://127.0.0.1:9"]) == 2  # missing --trace etc.
    trace = tmp_path / "t.json"
    write_trace(trace, 2)
    args = ["bench", "--endpoint", "http://127.0.0.1:9", "--trace", str(trace), "--out", str(tmp_path / "r"),
            "--no-progress"]
    assert cli_main(args + ["--baseline-ms", "0"]) == 2
    assert cli_main(args + ["--baseline-ms", "5"]) == 2  # nothing listens on port 9: a clear error, no results
    assert not (tmp_path / "r.txt").exists()


def test_serve_command_in_a_process(tmp_path):
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(PROFILE))
    port = free_port()
    cmd = [sys.executable, "-m", "adaserve", "serve", "--model", "tiny-llama", "--drafter", "ngram",
           "--profile", str(profile), "--port", str(port), "--threads", "1", "--served-model-name", "t",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(proc, url)
        assert httpx.get(f"{url}/health").json()["baseline_ms"] == BASELINE_MS  # the profile's
        with httpx.Client(base_url=url) as c:
            chunks = stream(c, "/v1/chat/completions", {"model": "t", "messages": MSG, "max_tokens": 4,
                                                        "stream_options": {"include_usage": True}},
                            headers={"x-slo-tpot-ms": "50"})
            assert chunks[-1]["usage"]["slo_ms"] == 50.0
            from adaserve.core.trace import TraceRecord
            from adaserve.runtime.replay import tokenize

            tok = resolve_model("tiny-llama")[1]
            rec = TraceRecord(0.0, 1, 4, MSG[0]["content"], 1.2)
            assert chunks[-1]["usage"]["prompt_tokens"] == len(tokenize(tok, [rec], chat_template=True)[0])
            out = c.post("/v1/completions", json={"model": "t", "prompt": TEXTS[2], "max_tokens": 2}).json()
            assert out["usage"]["prompt_tokens"] == len(tokenize(tok, [replace(rec, prompt=TEXTS[2])], False)[0])
            assert 'adaserve_requests_finished_total{category="chat"} 1' in c.get("/metrics").text
    finally:
        proc.terminate()
        proc.wait(20)


# ---- tokenization: one byte tokenizer for run and serve --------------------------------------------

TEXTS = ["def add(a, b):\n    return a + b\n", "Tell me a joke.", "añ€😀 — ünïcødé", "\x00\x01\x02\x7f ctl",
         "x" * 50]


def test_byte_tokenizer_round_trip_and_special_ids():
    tok = ByteTokenizer()
    for text in TEXTS + ["".join(map(chr, range(1, 0x800)))]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(3 <= t < 248 for t in ids)  # never BOS (1) / EOS (2) / 0; inside the tiny vocabulary
    assert tok.decode([1] + tok.encode("hi") + [2, 0, 9999]) == "hi"  # special and out-of-range ids: no text
    assert tok("hi").input_ids == tok.encode("hi")
    assert tok.encode("\ud800") and tok.decode(tok.encode("\ud800")) == "\ufffd" * 3  # lone surrogate: no error
    with pytest.raises(ValueError, match="vocabulary"):
        ByteTokenizer(64)


def test_run_and_serve_tokenize_tiny_models_alike():
    """``adaserve run`` (runtime.replay.tokenize over load_models's tokenizer) and ``adaserve serve``
    (build.codec_for over the same) give the same ids, for plain prompts and through the chat template."""
    from adaserve.core.trace import TraceRecord
    from adaserve.config import EngineConfig
    from adaserve.runtime.build import load_models
    from adaserve.runtime.replay import tokenize

    for name in ("tiny-llama", "tiny-qwen2"):
        model, tok, _ = load_models(EngineConfig(name))
        codec = codec_for(name, tok)
        records = [TraceRecord(0.0, 1, 4, t, 1.2) for t in TEXTS]
        assert tokenize(tok, records, chat_template=False) == [codec.encode(t) for t in TEXTS]
        assert tokenize(tok, records, chat_template=True) == [codec.chat_ids([{"role": "user", "content": t}])
                                                              for t in TEXTS]
        assert resolve_model(name)[1].encode("abc") == codec.encode("abc") == [0x61 + 3, 0x62 + 3, 0x63 + 3]
        assert max(max(ids) for ids in tokenize(tok, records, False)) < model.config.vocab_size


# ---- detokenization ------------------------------------------------------------------------------

def test_incremental_detokenizer_waits_for_whole_utf8_characters():
    codec = ByteTokenizer()
    ids = codec.encode("añ€😀b")
    d = IncrementalDetokenizer(codec)
    text = "".join(d.push([t]) for t in ids) + d.flush()
    assert text == "añ€😀b"
    assert IncrementalDetokenizer(codec).push(ids[1:2]) == ""  # half of "ñ": held back


def test_text_stream_never_sends_part_of_a_stop_string():
    codec = ByteTokenizer()
    s = TextStream(codec, stop=["STOP"])
    sent = [s.push(codec.encode(ch)) for ch in "abcST"]
    assert "".join(sent) == "ab"  # "cST" could start "STOP"? "ST" could: held back with c
    assert s.push(codec.encode("OPxyz")) == "c" and s.stopped and s.finish() == ""
    s = TextStream(codec, stop=["zz"])
    assert s.push(codec.encode("abz")) + s.push(codec.encode("q")) + s.finish() == "abzq" and not s.stopped
