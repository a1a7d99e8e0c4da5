"""`furiosa-llm serve`: the OpenAI-compatible server, live on loopback, with the real embedded model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import CACHE_DIR, MODEL, REPO

MAX_MODEL_LEN = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    cmd = [sys.executable, "-m", "furiosa_llm.entrypoints.cli", "serve", "--model", MODEL, "--cache-dir", CACHE_DIR,
           "--devices", "cpu", "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "2048",
           "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0", "--log-interval", "1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, log
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _wait_idle(url: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        if (_metric(text, "furiosa_llm:kv_cache_blocks_used") == 0 and _metric(text, "furiosa_llm:num_requests_running") == 0
                and _metric(text, "furiosa_llm:num_requests_waiting") == 0):
            return text
        assert time.monotonic() < deadline, f"engine still busy:\n{text}"
        time.sleep(0.2)


def test_official_openai_client(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]

    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.usage.prompt_tokens > 0
    assert done.usage.completion_tokens == len(httpx.post(f"{url}/tokenize", json={"prompt": done.choices[0].text,
                                                                                      "add_special_tokens": False}).json()["tokens"]) or done.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens

    # fields common clients send, harmless or vLLM extras, are accepted
    extra = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, user="me",
                                      extra_body={"ignore_eos": True, "repetition_penalty": 1.1, "top_k": 5})
    assert extra.usage.completion_tokens == 5 and extra.choices[0].finish_reason == "length"
    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in lp.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/completions", "{not json", 400, "JSON"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=2"),
    ("/v1/completions", {"prompt": [5] * 200}, 400, "max_model_len"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_model_len"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
    ("/tokenize", {}, 400, "prompt"),
    ("/v1/nope", {}, 404, "Not Found"),
])
def test_client_mistakes_are_4xx_in_openai_shape(server, path, body, status, needle):
    url, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower() and err["type"]


def test_tokenize_detokenize_version_health_metrics(server):
    url, log = server
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world", "model": MODEL}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == MAX_MODEL_LEN
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"].strip() == "Hello world"
    chat_ids = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_ids["count"] > ids["count"]  # the chat template adds its markers
    assert httpx.get(f"{url}/version").json()["version"]
    assert httpx.get(f"{url}/health").status_code == 200
    httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}, timeout=30)
    text = _wait_idle(url)
    for name in ("furiosa_llm:prompt_tokens_total", "furiosa_llm:generation_tokens_total",
                 "furiosa_llm:num_preemptions_total", "furiosa_llm:time_to_first_token_seconds_count",
                 "furiosa_llm:time_per_output_token_seconds_count", "furiosa_llm:e2e_request_latency_seconds_count",
                 "furiosa_llm:kv_cache_blocks_total"):
        assert _metric(text, name) >= 0
    assert _metric(text, "furiosa_llm:generation_tokens_total") >= 4
    time.sleep(1.5)
    assert "throughput: prompt" in log.read_text()  # the periodic stats line


def test_non_streaming_client_that_leaves_aborts_its_request(server):
    url, _ = server
    body = {"prompt": "Count:", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True}
    aborted_before = _aborted(url)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    t0 = time.monotonic()
    _wait_idle(url, timeout=10)
    # ~120 tokens take several seconds; freed long before that means it was aborted
    assert time.monotonic() - t0 < 3.0
    assert _aborted(url) - aborted_before == 1


async def _one_stream(client: httpx.AsyncClient, i: int, leave: bool) -> dict:
    body = {"model": MODEL, "prompt": f"Request {i}: tell me about the number {i}.", "max_tokens": 10,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text, usage, finish, events = "", None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return {"text": text, "usage": usage, "finish": finish, "done": True}
            events += 1
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                text += c["text"]
                finish = c["finish_reason"] or finish
            if leave and events >= 2:
                return {"left": True}  # closing the response mid-stream disconnects
    return {"text": text, "usage": usage, "finish": finish, "done": False}


def test_load_256_streams_a_tenth_disconnect(server):
    url, _ = server

    async def run():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:
            return await asyncio.gather(*(_one_stream(client, i, i % 10 == 0) for i in range(256)))

    aborted_before = _aborted(url)
    t0 = time.monotonic()
    results = asyncio.run(run())
    wall = time.monotonic() - t0
    stayed = [r for r in results if not r.get("left")]
    assert len(stayed) == 256 - 26
    for r in stayed:
        assert r["done"] and r["finish"] == "length" and r["usage"]["completion_tokens"] == 10, r
    text = _wait_idle(url, timeout=30)
    assert _metric(text, "furiosa_llm:kv_cache_blocks_used") == 0
    assert _aborted(url) - aborted_before == 26  # the leavers were aborted, not run to the end
    assert httpx.get(f"{url}/health").status_code == 200
    print(f"256 streams in {wall:.1f}s")


def _aborted(url: str) -> float:
    m = re.search(r'^furiosa_llm:request_success_total{[^}]*finished_reason="abort"[^}]*} ([0-9.e+-]+)$',
                  httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_fuzzing_the_openapi_schema_finds_no_5xx(server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in ops} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                                          "GET /health", "GET /v1/models", "POST /tokenize"}
    for op in ops:
        modes = [schemathesis.GenerationMode.POSITIVE]
        if op.method == "post":
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=15 if op.method == "post" else 1, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call(base_url=url, timeout=60)
                if r.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} -> {r.status_code}: {case.body!r:.300} {r.text[:300]}")

            check()
    assert not failures, "\n".join(failures[:5])
    assert httpx.get(f"{url}/health").status_code == 200
    _wait_idle(url, timeout=60)


# ---- in-process: API key and a dead engine ----------------------------------------------------
@pytest.fixture
def app_client(async_engine):
    from furiosa_llm.entrypoints.openai.api_server import create_app

    def make(**kw):
        app = create_app(async_engine, served_model_name=MODEL, log_interval_s=0, **kw)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    return make


async def test_api_key_is_required_on_v1_when_set(app_client):
    async with app_client(api_key="sekrit") as c:
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})).status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_health_is_503_when_the_engine_is_dead(app_client, async_engine, monkeypatch):
    from furiosa_llm import AsyncEngineDeadError

    async def dead():
        raise AsyncEngineDeadError("boom")

    monkeypatch.setattr(async_engine, "check_health", dead)
    async with app_client() as c:
        r = await c.get("/health")
        assert r.status_code == 503 and "boom" in r.json()["error"]["message"]


async def test_chat_template_override(app_client, async_engine, tmp_path):
    from furiosa_llm.entrypoints.serve import load_chat_template

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template == load_chat_template(template)
    with pytest.raises(ValueError, match="chat_template"):
        load_chat_template("no/such/file")
    async with app_client(chat_template=template) as c:
        r = await c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert async_engine.tokenizer.decode(r.json()["tokens"]) == "[user] hi\n"
