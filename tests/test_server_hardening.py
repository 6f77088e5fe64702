"""The server under hostile or broken clients, on a live loopback server (the fixtures of
test_server.py): a request's sampling settings never fail other requests, a huge prompt neither
freezes the event loop nor gets tokenized, half-sent and aborted uploads, lone surrogates,
made-up metrics categories, ``GET /v1/models/{id}``, and the ``prometheus_client`` metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Phase, Request
from adaserve.engine import NgramDrafter, TorchExecutor, tiny_random_model
from adaserve.engine.sequence import SamplingOptions
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import make_policy
from adaserve.server import ServerConfig, create_app
from adaserve.server.metrics import KNOWN_CATEGORIES, ServerMetrics, parse_prometheus
from adaserve.server.tokenizer import ByteTokenizer
from test_server import BASELINE_MS, MAX_SEQ, PROFILE, LiveServer, make_engine, metrics, slow_engine, sse_payloads, \
    wait_idle

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_ID = "org/tiny"  # an id with a slash, as Hugging Face ids have
C, CH = "/v1/completions", "/v1/chat/completions"
SUBNORMAL = 5e-324


class StrictCodec(ByteTokenizer):
    """The byte tokenizer, but refusing text that is not valid Unicode as Hugging Face tokenizers
    do (they raise TypeError on a lone surrogate), and optionally slow (``delay_s`` per encode)."""

    delay_s = 0.0

    def encode(self, text: str) -> list[int]:
        time.sleep(self.delay_s)
        text.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        self.encoded += len(text)
        return super().encode(text)

    encoded = 0  # characters tokenized so far


@pytest.fixture(scope="module")
def live():
    model, ex, engine = make_engine(ignore_eos=True)
    codec = StrictCodec()
    app = create_app(engine, codec, ServerConfig(MODEL_ID, BASELINE_MS, ignore_eos=True, body_timeout_s=0.5))
    srv = LiveServer(app)
    srv.model, srv.ex, srv.engine, srv.codec = model, ex, engine, codec
    srv.server_obj = app.state.server
    srv.client = httpx.Client(base_url=srv.url, timeout=60)
    yield srv
    srv.client.close()
    srv.stop()


def server_errors(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith('adaserve_http_errors_total{status="5'))


def disconnects(m: dict, stage: str) -> float:
    return m.get(f'adaserve_client_disconnects_total{{stage="{stage}"}}', 0.0)


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post(C, json=b) for b in bodies))
    return asyncio.run(run())


# ---- 7: a request's sampling settings never fail the others ----------------------------------------

def test_tiny_temperatures_are_refused_and_the_batch_is_unaffected(live):
    before = metrics(live.client)
    good = {"prompt": "same batch", "max_tokens": 12}
    bodies = [good, {**good, "temperature": SUBNORMAL}, {**good, "temperature": 1.0}, {**good, "temperature": 1e-3},
              good]
    with slow_engine(live.ex, 0.005):
        rs = post_all(live.url, bodies)
    for body, r in zip(bodies, rs):
        t = body.get("temperature")
        if t in (SUBNORMAL, 1e-3):
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "temperature" and "0.01" in err["message"]
        else:
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12, r.text
    m = wait_idle(live)
    assert m["adaserve_engine_failures_total"] == before["adaserve_engine_failures_total"]
    assert server_errors(m) == server_errors(before)


def _bad_sampling(ex: TorchExecutor, rid: int) -> None:
    """Options that pass every check but break sampling (logits / 5e-324 overflow: NaN probabilities)."""
    ex.set_options({rid: SamplingOptions(temperature=SUBNORMAL, ignore_eos=True)})


@pytest.mark.parametrize("where", ["first token", "decode step"])
def test_engine_fails_only_the_request_whose_sampling_fails(where):
    """In one batch, the request whose sampling raises ends (``StepOutput.failed`` -> finish reason
    "error" with the reason on the request), the others
    finish with their full output, identical to a run without the bad request."""
    model = tiny_random_model("llama", seed=1)

    def run(with_bad: bool):
        ex = TorchExecutor(model, LatencyProfile.from_dict(PROFILE), NgramDrafter(), ignore_eos=True)
        rng = np.random.default_rng(0)
        reqs = [Request(i, 0.0, 8, 10, 1000.0, math.inf, "x") for i in range(4)]
        ex.set_prompts({r.rid: rng.integers(3, 250, 8).tolist() for r in reqs})
        ex.set_options({0: SamplingOptions(temperature=0.8, seed=3, ignore_eos=True),
                        1: SamplingOptions(temperature=1.0, top_p=0.9, ignore_eos=True)})
        loop = ServingLoop(make_policy("adaserve", "llama"), ex, reqs)
        if with_bad and where == "first token":
            _bad_sampling(ex, 2)
        loop.run_once()  # every prompt is prefilled in the first step
        assert all(r.generated >= 1 for r in reqs)
        if with_bad and where == "decode step":
            _bad_sampling(ex, 2)
        loop.run()
        return ex, reqs

    ex, reqs = run(True)
    ref_ex, _ = run(False)
    assert [r.rid for r in reqs if r.finish_reason == "error"] == [2]
    bad = reqs[2]
    assert bad.error.startswith("sampling failed"), bad.error
    assert bad.phase == Phase.FINISHED and bad.generated <= 1
    for r in reqs:
        if r.rid != 2:
            assert r.phase == Phase.FINISHED and r.generated == 10
    assert ex.outputs[0] == ref_ex.outputs[0]  # the seeded request: token-identical
    assert ex.outputs[3] == ref_ex.outputs[3]  # the greedy one too
    assert ex.cache.alloc.free_blocks == ref_ex.cache.alloc.free_blocks


def test_sampling_failure_fails_its_request_alone_on_the_server(live, monkeypatch):
    """Sampling settings that slip past validation and break: that request ends with an error
    (500 / an error event); the requests in the same batches finish normally; the engine thread
    does not count an iteration failure."""
    server = live.server_obj
    real = server.sampling

    def poisoned(req):
        return SamplingOptions(temperature=SUBNORMAL, ignore_eos=True) if req.user == "poison" else real(req)
    monkeypatch.setattr(server, "sampling", poisoned)
    before = metrics(live.client)
    good = {"prompt": "neighbours", "max_tokens": 16}
    bodies = [good, {**good, "user": "poison"}, {**good, "temperature": 0.7}, good]
    with slow_engine(live.ex, 0.005):
        rs = post_all(live.url, bodies)
        with live.client.stream("POST", C, json={**good, "user": "poison", "stream": True}) as r:
            payloads = sse_payloads(r.read().decode())
    assert [r.status_code for r in rs] == [200, 500, 200, 200], [r.text for r in rs]
    assert "sampling" in rs[1].json()["error"]["message"] and rs[1].json()["error"]["code"] == "engine_failure"
    assert all(r.json()["usage"]["completion_tokens"] == 16 for r in rs if r.status_code == 200)
    assert payloads[-1] == "[DONE]" and "sampling" in json.loads(payloads[-2])["error"]["message"]
    m = wait_idle(live)
    assert m["adaserve_engine_failures_total"] == before["adaserve_engine_failures_total"]
    failed = sum(v for k, v in m.items() if 'outcome="failed"' in k) - \
        sum(v for k, v in before.items() if 'outcome="failed"' in k)
    assert failed == 2
    assert not any(live.ex.state_size().values())  # nothing kept for the failed requests


def test_server_default_temperature_is_checked():
    for t in (SUBNORMAL, 1e-3, math.inf, math.nan):
        with pytest.raises(UserError, match="temperature"):
            ServerConfig("m", 1.0, temperature=t)
    assert ServerConfig("m", 1.0, temperature=0.01).temperature == 0.01


# ---- 8: large prompts --------------------------------------------------------------------------------

def test_huge_prompt_is_refused_without_tokenizing_it(live):
    before = live.codec.encoded
    t0 = time.perf_counter()
    for path, body in ((C, {"prompt": "x" * 10_000_000, "max_tokens": 1}),
                       (CH, {"messages": [{"role": "user", "content": "y" * 10_000_000}]})):
        r = live.client.post(path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded")
        assert "10000000 characters" in err["message"] and f"at most {MAX_SEQ * 16} characters" in err["message"]
    assert live.codec.encoded == before  # never tokenized
    assert time.perf_counter() - t0 < 10
    # token-id prompts are checked by their length, before the vocabulary check
    r = live.client.post(C, json={"prompt": [5] * 100_000})
    assert r.status_code == 400 and "100000 tokens" in r.json()["error"]["message"]


def test_tokenization_runs_off_the_event_loop(live):
    """While a (slow) prompt is being tokenized, /health and other streams are answered."""
    live.codec.delay_s = 1.5
    try:
        t = threading.Thread(target=lambda: live.client.post(C, json={"prompt": "slow", "max_tokens": 2}))
        t.start()
        time.sleep(0.2)  # the request is now in the tokenizer
        with httpx.Client(base_url=live.url, timeout=10) as c:
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            health_s = time.perf_counter() - t0
        t.join(10)
    finally:
        live.codec.delay_s = 0.0
    assert health_s < 0.75, f"/health took {health_s:.2f} s while a prompt was tokenized"


# ---- 9: half-sent and aborted uploads ---------------------------------------------------------------

def _partial_upload(url: str, sent: bytes, declared: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % declared + sent)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_half_sent_body_gets_408_and_the_connection_is_closed(live):
    t0 = time.perf_counter()
    with _partial_upload(live.url, b'{"prompt": "never finish', 1000) as s:
        reply = _read_all(s)  # returns once the server closes the connection
    took = time.perf_counter() - t0
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "0.5 s" in err["message"]
    assert took < 5
    assert metrics(live.client)['adaserve_http_errors_total{status="408"}'] >= 1


def test_body_size_limit_with_and_without_a_declared_length(live, monkeypatch):
    monkeypatch.setattr(live.server_obj.cfg, "max_body_bytes", 1000)
    body = json.dumps({"prompt": "z" * 2000}).encode()
    r = live.client.post(C, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
    chunked = live.client.post(C, content=iter([body[:600], body[600:]]), headers={"content-type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"


@contextmanager
def captured_logs():
    """Every record of our and uvicorn's loggers at WARNING or above."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    h = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("uvicorn", "adaserve")]
    for lg in loggers:
        lg.addHandler(h)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def test_aborted_uploads_are_client_disconnects_not_server_errors(live):
    before = metrics(live.client)
    n = 20
    with captured_logs() as logs:
        for i in range(n):
            s = _partial_upload(live.url, b'{"prompt": "abandoned %d' % i, 500)
            time.sleep(0.01)
            s.close()
        deadline = time.time() + 10
        while disconnects(m := metrics(live.client), "body") < disconnects(before, "body") + n:
            assert time.time() < deadline, m
            time.sleep(0.05)
    assert disconnects(m, "body") == disconnects(before, "body") + n
    assert server_errors(m) == server_errors(before)
    assert not [r for r in logs if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in logs]


def test_disconnects_while_waiting_or_streaming_are_counted(live):
    before = metrics(live.client)
    with slow_engine(live.ex, 0.02):
        with live.client.stream("POST", C, json={"prompt": "go away", "max_tokens": 200, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}{C}", json={"prompt": "wait", "max_tokens": 200}, timeout=0.4)
        m = wait_idle(live)
    assert disconnects(m, "stream") == disconnects(before, "stream") + 1
    assert disconnects(m, "response") == disconnects(before, "response") + 1
    assert server_errors(m) == server_errors(before)


# ---- 10: lone surrogates -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, raw, param", [
    (C, '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    (C, '{"prompt": ["\\udfff"], "max_tokens": 2}', "prompt"),
    (CH, '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}', "messages"),
    (C, '{"model": "\\ud800", "prompt": "x"}', "model"),
    (C, '{"prompt": "x", "stop": ["\\udc00"]}', "stop"),
    (C, '{"prompt": "x", "slo_category": "\\ud800"}', "slo_category"),
    (C, '{"prompt": "x", "\\ud800": 1}', None),
])
def test_lone_surrogates_are_a_400(live, path, raw, param):
    before = metrics(live.client)
    r = live.client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, "invalid_value") and "surrogate" in err["message"]
    assert server_errors(metrics(live.client)) == server_errors(before)


def test_surrogate_pairs_are_fine(live):
    raw = '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    r = live.client.post(C, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len("smile ".encode()) + 4


# ---- 11: metrics categories ----------------------------------------------------------------------------

def test_made_up_categories_are_counted_as_other(live):
    before = metrics(live.client)
    n = 40
    rs = post_all(live.url, [{"prompt": "c", "max_tokens": 1, "slo_category": f"made-up-{i}"} for i in range(n)]
                  + [{"prompt": "c", "max_tokens": 1, "slo_category": "chat"}])
    assert all(r.status_code == 200 for r in rs)
    assert rs[0].json()["usage"]["slo_category"] == "made-up-0"  # the answer still names it
    m = wait_idle(live)
    cats = {s.labels["category"] for f in text_string_to_metric_families(live.client.get("/metrics").text)
            for s in f.samples if "category" in s.labels}
    assert "other" in cats and cats <= set(KNOWN_CATEGORIES) | {"other"}, cats
    key = 'adaserve_requests_finished_total{category="other"}'
    assert m[key] - before.get(key, 0) == n
    key = 'adaserve_requests_finished_total{category="chat"}'
    assert m[key] - before.get(key, 0) == 1


def test_configured_categories_are_label_values():
    m = ServerMetrics()
    m.bind(lambda: {}, {"model": "m"}, categories=("gold", "silver"))
    for cat in ("gold", "coding", "bronze"):
        r = Request(1, 0.0, 3, 2, 1000.0, math.inf, cat)
        r.phase = Phase.CANCELLED
        m.request_done(r)
    got = parse_prometheus(m.render().decode())
    assert got['adaserve_requests_ended_total{category="gold",outcome="cancelled"}'] == 1
    assert got['adaserve_requests_ended_total{category="other",outcome="cancelled"}'] == 2


# ---- 12: GET /v1/models/{id} ---------------------------------------------------------------------------

def test_model_retrieve(live):
    r = live.client.get(f"/v1/models/{MODEL_ID}")
    assert r.status_code == 200, r.text
    card = r.json()
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL_ID, "model", MAX_SEQ)
    assert card == {**live.client.get("/v1/models").json()["data"][0], "created": card["created"]}
    r = live.client.get("/v1/models/gpt-4")
    assert r.status_code == 404
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "gpt-4" in err["message"]


def test_model_retrieve_needs_the_api_key():
    _, _, engine = make_engine(seed=5)
    srv = LiveServer(create_app(engine, ByteTokenizer(), ServerConfig("m", BASELINE_MS, api_key="k")))
    try:
        assert httpx.get(f"{srv.url}/v1/models/m").status_code == 401
        assert httpx.get(f"{srv.url}/v1/models/m", headers={"Authorization": "Bearer k"}).status_code == 200
    finally:
        srv.stop()


# ---- issue 11, item 6: prometheus_client ---------------------------------------------------------------

def test_metrics_registries_are_per_app_and_the_exposition_is_standard():
    a, b = ServerMetrics(), ServerMetrics()
    for m, snap in ((a, {"running": 3, "request_steps": 4, "committed_tokens": 10}), (b, {})):
        m.bind(lambda snap=snap: snap, {"model": "m", "system": "adaserve", "baseline_ms": 2.0})
    a.http_error(400)
    a.http_error(400)
    b.client_disconnect("body")
    r = Request(1, 0.0, 5, 3, 1.2, 2.4, "coding", phase=Phase.FINISHED, generated=3, first_decode_ms=1.0,
                first_token_ms=1.0, finish_ms=4.0, token_times_ms=[1.0, 2.0, 4.0])
    a.request_done(r)
    text_a, text_b = a.render().decode(), b.render().decode()
    assert "_created" not in text_a
    fams = {f.name: f for f in text_string_to_metric_families(text_a)}  # the reference parser accepts it
    assert fams["adaserve_http_errors"].type == "counter"
    assert fams["adaserve_time_to_first_token_seconds"].type == "histogram"
    pa, pb = parse_prometheus(text_a), parse_prometheus(text_b)
    assert pa['adaserve_http_errors_total{status="400"}'] == 2 and 'adaserve_http_errors_total{status="400"}' not in pb
    assert pb['adaserve_client_disconnects_total{stage="body"}'] == 1
    assert pa["adaserve_num_requests_running"] == 3 and pa["adaserve_mean_generated_tokens_per_step"] == 2.5
    assert math.isnan(pb["adaserve_mean_generated_tokens_per_step"])
    assert pa['adaserve_slo_attainment{category="coding"}'] == 1.0
    assert pa['adaserve_time_per_output_token_seconds_count{category="coding"}'] == 1
    assert pa['adaserve_info{baseline_ms="2.0",model="m",system="adaserve"}'] == 1
