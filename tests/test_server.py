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
        if (_metric(text, "furiosa_llm_kv_cache_usage_percent") == 0 and _metric(text, "furiosa_llm_num_requests_running") == 0
                and _metric(text, "furiosa_llm_num_requests_waiting") == 0):
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
    for name in ("furiosa_llm_prompt_tokens_total", "furiosa_llm_generation_tokens_total",
                 "furiosa_llm_num_preemptions_total", "furiosa_llm_time_to_first_token_seconds_count",
                 "furiosa_llm_inter_token_latency_seconds_count", "furiosa_llm_e2e_request_latency_seconds_count",
                 "furiosa_llm_prefix_cache_hits_total", "furiosa_llm_prefix_cache_queries_total"):
        assert _metric(text, name) >= 0
    assert _metric(text, "furiosa_llm_generation_tokens_total") >= 4
    time.sleep(1.5)
    assert "Avg generation throughput" in log.read_text()  # the periodic stats line


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
    assert _metric(text, "furiosa_llm_kv_cache_usage_percent") == 0
    assert _aborted(url) - aborted_before == 26  # the leavers were aborted, not run to the end
    assert httpx.get(f"{url}/health").status_code == 200
    print(f"256 streams in {wall:.1f}s")


def _aborted(url: str) -> float:
    m = re.search(r'^furiosa_llm_request_success_total{[^}]*finished_reason="abort"[^}]*} ([0-9.e+-]+)$',
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


# ---- validation: NaN, unsupported features ------------------------------------------------------
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                "length_penalty")
CHAT = [{"role": "user", "content": "Hi"}]


def _assert_openai_error(r: httpx.Response, status: int | tuple = 400, param: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"] and err["type"], err
    if param is not None:
        assert err["param"] == param and param in err["message"], err
    return err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinite_floats_are_400_naming_the_field(server, path, literal):
    """Python's json (and Starlette's request.json) read NaN and Infinity; the server refuses them."""
    url, _ = server
    head = '"prompt": "Hi"' if path == "/v1/completions" else f'"messages": {json.dumps(CHAT)}'
    with httpx.Client(base_url=url, timeout=30) as client:
        for field in FLOAT_FIELDS:
            r = client.post(path, content=f'{{{head}, "max_tokens": 2, "{field}": {literal}}}',
                            headers={"content-type": "application/json"})
            _assert_openai_error(r, 400, field)
        r = client.post(path, content=f'{{{head}, "logit_bias": {{"5": {literal}}}}}',
                        headers={"content-type": "application/json"})
        _assert_openai_error(r, 400, "logit_bias")


UNSUPPORTED = [
    ("/v1/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"n": 3}, "n"),
    ("/v1/chat/completions", {"best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
]


@pytest.mark.parametrize("path,extra,field", UNSUPPORTED, ids=[f"{p.split('/')[-1]}-{f}" for p, _, f in UNSUPPORTED])
def test_a_field_naming_an_unimplemented_feature_is_400(server, path, extra, field):
    url, _ = server
    base = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT}
    r = httpx.post(f"{url}{path}", json={**base, "max_tokens": 2, **extra}, timeout=30)
    _assert_openai_error(r, 400, field)


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"response_format": {"type": "text"}, "best_of": 1, "logit_bias": {}, "use_beam_search": False,
                         "n": 1, "suffix": "", "user": "me", "metadata": {"a": "b"}}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}, "tool_choice": "none", "logit_bias": {},
                              "tools": [{"type": "function", "function": {"name": "f"}}], "echo": False}),
])
def test_the_no_op_value_of_an_unsupported_field_is_accepted(server, path, extra):
    url, _ = server
    base = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT}
    r = httpx.post(f"{url}{path}", json={**base, "max_tokens": 2, **extra}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "seed": -(2**64)}, "seed"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
    ({"prompt": "x", "top_k": 10**12}, "top_k"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "x", "min_tokens": 10**30}, "min_tokens"),
    ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": "x", "stop": 5}, "stop"),
])
def test_completion_field_audit(server, body, param):
    """Type, lower and upper bound of the completion fields: each bad value is a 400 naming its field."""
    url, _ = server
    _assert_openai_error(httpx.post(f"{url}/v1/completions", json=body, timeout=30), 400, param)


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_tokens"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"add_generation_prompt": "no"}, "add_generation_prompt"),
])
def test_chat_field_audit(server, extra, param):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **extra}, timeout=30)
    _assert_openai_error(r, 400, param)


# ---- echo with logprobs: the prompt is scored too ----------------------------------------------------
def _completion(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _streamed_completion(url: str, body: dict) -> dict:
    """The chunks of a streamed completion folded into the shape of a whole one (one prompt)."""
    text, finish, usage = "", None, None
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    saw_lp = False
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for data in lines[:-1]:
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            text += c["text"]
            finish = c["finish_reason"] or finish
            if c["logprobs"] is not None:
                saw_lp = True
                for k in lp:
                    lp[k] += c["logprobs"][k]
    return {"text": text, "finish_reason": finish, "usage": usage, "logprobs": lp if saw_lp else None}


def _prompt_ids(url: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": True}).json()["tokens"]


def test_echo_with_logprobs_scores_the_prompt_tokens(server):
    url, _ = server
    prompt = "The capital of France is"
    ids = _prompt_ids(url, prompt)
    body = {"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 2, "temperature": 0, "ignore_eos": True}
    out = _completion(url, body)
    choice, usage = out["choices"][0], out["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == 4
    assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    lp = choice["logprobs"]
    n = len(ids) + 4
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    # the first prompt token has nothing before it: null logprob, null top logprobs
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(isinstance(t, dict) and len(t) == 2 for t in lp["top_logprobs"][1:])
    # text_offset counts characters of the echoed text from 0
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    assert "".join(lp["tokens"]) == choice["text"]
    assert "".join(lp["tokens"][: len(ids)]) == prompt
    # the prompt entries are the model's: the logprob of a generated token and of the same token as
    # the last prompt token agree
    plain = _completion(url, {**body, "echo": False})
    assert plain["choices"][0]["text"] == choice["text"][len(prompt):]
    first_lp = plain["choices"][0]["logprobs"]["token_logprobs"][0]
    assert lp["token_logprobs"][len(ids)] == pytest.approx(first_lp, abs=1e-4)
    first_id = httpx.post(f"{url}/tokenize", json={"prompt": prompt + plain["choices"][0]["logprobs"]["tokens"][0],
                                                   "add_special_tokens": True}).json()["tokens"]
    if first_id[: len(ids)] == ids and len(first_id) == len(ids) + 1:
        scored = _completion(url, {"prompt": first_id, "max_tokens": 0, "echo": True, "logprobs": 1})
        assert scored["choices"][0]["logprobs"]["token_logprobs"][-1] == pytest.approx(first_lp, abs=1e-3)


def test_echo_with_max_tokens_0_scores_the_prompt_only(server):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    url, _ = server
    prompt = "Paris is the capital of France"
    ids = _prompt_ids(url, prompt)
    out = _completion(url, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and all(x is not None for x in lp["token_logprobs"][1:])
    assert lp["text_offset"][0] == 0
    # several prompts at once, token-id prompts too; each scored on its own
    two = _completion(url, {"prompt": [ids, ids[:3]], "max_tokens": 0, "echo": True, "logprobs": 0})
    a, b = sorted(two["choices"], key=lambda c: c["index"])
    assert a["text"] == prompt and prompt.startswith(b["text"])
    assert a["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)
    assert b["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:3], abs=1e-4)
    assert two["usage"]["completion_tokens"] == 0 and two["usage"]["prompt_tokens"] == len(ids) + 3
    # echo without logprobs, and a repeated prompt (the prefix cache) give the same scores
    assert _completion(url, {"prompt": prompt, "max_tokens": 0, "echo": True})["choices"][0]["text"] == prompt
    again = _completion(url, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert again["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)


@pytest.mark.parametrize("body", [
    {"prompt": "The capital of France is", "max_tokens": 6, "echo": True, "logprobs": 3, "temperature": 0},
    {"prompt": "Grüße aus Köln — 日本語 🙂", "max_tokens": 5, "echo": True, "logprobs": 1, "temperature": 0,
     "ignore_eos": True},
    {"prompt": "One, two, three,", "max_tokens": 12, "echo": True, "logprobs": 2, "stop": [" six"], "temperature": 0,
     "ignore_eos": True},
    {"prompt": "Hello", "max_tokens": 5, "logprobs": 2, "temperature": 0, "ignore_eos": True},
    {"prompt": "Paris is the capital of France", "max_tokens": 0, "echo": True, "logprobs": 2},
])
def test_streamed_echo_logprobs_equal_the_whole_response(server, body):
    url, _ = server
    whole = _completion(url, body)
    streamed = _streamed_completion(url, body)
    choice = whole["choices"][0]
    assert streamed["text"] == choice["text"]
    assert streamed["finish_reason"] == choice["finish_reason"]
    assert streamed["usage"] == whole["usage"]
    a, b = streamed["logprobs"], choice["logprobs"]
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
    if body.get("echo"):
        assert a["token_logprobs"][0] is None and a["text_offset"][0] == 0
        assert streamed["text"].startswith(body["prompt"])


# ---- stream integrity: streamed text joined equals the whole response's text ------------------------
PROMPTS = ["What is 2+2?", "Tell me a story about a cat.", "Grüße aus Köln, sagte er.", "日本語で答えてください。",
           "Emoji time: 🙂🙃🎉 and more", "List three colours:", "Ĉu vi parolas Esperanton?", "1, 2, 3,"]
STOPS = [".", " the", "\n", ",", "é", "🙂", " a", "!", "the cat", "3"]


def _streamed_chat(url: str, body: dict) -> dict:
    text, finish, usage = "", None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for data in lines[:-1]:
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            text += c["delta"].get("content") or ""
            finish = c["finish_reason"] or finish
    return {"text": text, "finish_reason": finish, "usage": usage}


def test_streamed_text_equals_the_whole_text_for_random_requests(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, _ = server

    @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(chat=st.booleans(), prompt=st.sampled_from(PROMPTS), stop=st.lists(st.sampled_from(STOPS), max_size=3),
           max_tokens=st.integers(1, 24), min_tokens=st.integers(0, 10), include=st.booleans(),
           greedy=st.booleans(), seed=st.integers(0, 2**31), skip_special=st.booleans())
    def check(chat, prompt, stop, max_tokens, min_tokens, include, greedy, seed, skip_special):
        body = {"max_tokens": max_tokens, "min_tokens": min(min_tokens, max_tokens), "stop": stop,
                "include_stop_str_in_output": include, "skip_special_tokens": skip_special,
                "temperature": 0 if greedy else 0.9, "seed": seed}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            whole = r.json()
            text, finish = whole["choices"][0]["message"]["content"], whole["choices"][0]["finish_reason"]
            streamed = _streamed_chat(url, body)
        else:
            body["prompt"] = prompt
            whole = _completion(url, body)
            text, finish = whole["choices"][0]["text"], whole["choices"][0]["finish_reason"]
            streamed = _streamed_completion(url, body)
        assert streamed["text"] == text, body
        assert streamed["finish_reason"] == finish, body
        assert streamed["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"], body
        if finish == "stop" and stop and not include and not min_tokens:
            # (before min_tokens outputs exist stop strings are not searched, as in vLLM, so they may stay in the text)
            assert not any(s in text for s in stop), body

    check()


# ---- poison among normal traffic ---------------------------------------------------------------
C, CC = "/v1/completions", "/v1/chat/completions"
POISON = [  # (path, JSON body as text or object); each must be a 4xx in OpenAI's shape
    (C, '{"prompt": "Hi", "temperature": NaN}'),
    (C, '{"prompt": "Hi", "top_p": Infinity}'),
    (C, '{"prompt": "Hi", "min_p": -Infinity}'),
    (CC, '{"messages": [{"role": "user", "content": "Hi"}], "presence_penalty": NaN}'),
    (CC, '{"messages": [{"role": "user", "content": "Hi"}], "repetition_penalty": 1e999}'),
    (C, {"prompt": "Hi", "max_tokens": 10**30}),
    (C, {"prompt": "Hi", "max_tokens": -5}),
    (C, {"prompt": "Hi", "logprobs": 10**30}),
    (C, {"prompt": "Hi", "logprobs": -1}),
    (C, {"prompt": "Hi", "logprobs": 21}),
    (C, {"prompt": "Hi", "echo": True, "max_tokens": 0, "logprobs": 1000}),
    (CC, {"messages": CHAT, "logprobs": True, "top_logprobs": 21}),
    (C, {"prompt": "Hi", "top_k": 10**30}),
    (C, {"prompt": "Hi", "top_k": 10**6}),
    (C, {"prompt": "Hi", "top_k": -7}),
    (C, {"prompt": "Hi", "seed": 10**30}),
    (C, {"prompt": "Hi", "seed": -(10**30)}),
    (C, {"prompt": "Hi", "min_tokens": 10**30}),
    (C, {"prompt": "Hi", "stop_token_ids": [10**12]}),
    (C, {"prompt": "Hi", "stop_token_ids": [-1]}),
    (C, {"prompt": [10**12]}),
    (C, {"prompt": [5] * 500}),
    (C, {"prompt": 5}),
    (C, {"prompt": "Hi", "max_tokens": "10"}),
    (C, {"prompt": "Hi", "temperature": True}),
    (C, {"prompt": "Hi", "stream": "yes"}),
    (C, {"prompt": "Hi", "stop": {"a": 1}}),
    (CC, {"messages": [{"role": "user", "content": 5}]}),
    (CC, {"messages": [{"role": "user"}], "max_tokens": [1]}),
    (C, "[1, 2, 3]"),
    (C, {"prompt": "Hi", "guided_json": {"type": "objectx"}}),
    (C, {"prompt": "Hi", "structured_outputs": {"choice": []}}),
    (C, {"prompt": "Hi", "guided_regex": "a(b"}),
    (CC, {"messages": CHAT,
          "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": "x"}}}}),
    (CC, {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}),  # auto: not enabled
    (C, {"prompt": "Hi", "n": 4}),
    (C, {"prompt": "Hi", "best_of": 4}),
    (C, {"prompt": "Hi", "use_beam_search": True}),
    (C, {"prompt": "Hi", "logit_bias": {"1": 5}}),
    (C, {"prompt": "Hi", "suffix": "!"}),
]


async def _poison(client: httpx.AsyncClient, path: str, body) -> tuple[int, dict]:
    if isinstance(body, str):
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=body)
    return r.status_code, r.json()


def test_poison_requests_among_64_streams_harm_no_one(server):
    """Each poison request is a 4xx; every normal stream completes; the engine stays healthy, no KV block leaks."""
    import random

    url, _ = server

    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:
            jobs = [("normal", i) for i in range(64)] + [("poison", i) for i in range(len(POISON))]
            random.Random(0).shuffle(jobs)

            async def job(kind, i):
                if kind == "normal":
                    return kind, i, await _one_stream(client, i, leave=False)
                await asyncio.sleep(0.01 * (i % 8))  # spread the poison over the streams' lifetime
                return kind, i, await _poison(client, *POISON[i])

            results = await asyncio.gather(*(job(k, i) for k, i in jobs))
            health = (await client.get("/health")).status_code
            return results, health

    results, health = asyncio.run(run())
    assert health == 200
    bad = []
    for kind, i, res in results:
        if kind == "normal":
            if not (res["done"] and res["finish"] == "length" and res["usage"]["completion_tokens"] == 10):
                bad.append(f"normal stream {i}: {res}")
        else:
            status, body = res
            err = body.get("error") if isinstance(body, dict) else None
            if not (400 <= status < 500 and err and err.get("message") and err.get("type")):
                bad.append(f"poison {POISON[i]!r:.120} -> {status} {body!r:.200}")
    assert not bad, "\n".join(bad)
    text = _wait_idle(url, timeout=30)
    assert _metric(text, "furiosa_llm_kv_cache_usage_percent") == 0
    assert httpx.get(f"{url}/health").status_code == 200
    # and the server still serves
    assert _completion(url, {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})["usage"]["completion_tokens"] == 3


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


async def test_a_request_that_fails_in_the_engine_gets_a_500_in_openai_shape(async_engine, monkeypatch):
    """A failed request (its step raised: ``RequestFailedError``) is a 500 naming the cause, or an error event."""
    from furiosa_llm import RequestFailedError
    from furiosa_llm.entrypoints.openai.api_server import create_app

    real = async_engine.generate

    async def failing(prompt, params, request_id):  # the request's last step fails
        async for out in real(prompt, params, request_id):
            if out.finished:
                raise RequestFailedError(request_id, "RuntimeError: boom in the step")
            yield out

    monkeypatch.setattr(async_engine, "generate", failing)
    app = create_app(async_engine, served_model_name=MODEL, log_interval_s=0)
    # raise_app_exceptions: the 500 must be the whole answer (a re-raise would drop the client's connection)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
        body = {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"], r.text
        r = await c.post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert "boom" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == 500
        assert r.text.rstrip().endswith("data: [DONE]")  # as vLLM: [DONE] after the error event
        r = await c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert "boom" in events[-1]["error"]["message"]
        assert r.text.rstrip().endswith("data: [DONE]")
        # the three failures count as finished_reason "error", streamed or not (found by a fresh user: streamed
        # ones counted as "abort", the others not at all)
        m = (await c.get("/metrics")).text
        assert any(line.startswith("furiosa_llm_request_success_total{") and 'finished_reason="error"' in line
                   and line.endswith(" 3.0") for line in m.splitlines()), m
    assert async_engine.native_engine.stats().num_kv_blocks_used == 0
