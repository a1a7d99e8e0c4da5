"""`furiosa-llm serve` and the CLI as a Furiosa-LLM user calls them: the command line, `version`,
`collect-env`, the model card, `/tokenizer_info`, CORS, the chat options, and the `furiosa_llm_*`
Prometheus series; and `furiosa-llm serve MODEL --no-enable-prefix-caching --allowed-origins '*'`
serving the `openai` client."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import CACHE_DIR, MODEL, REPO

# Options of Furiosa-LLM's `serve` (2025.x-2026.4), each with a value, as a deployment passes them.
FURIOSA_SERVE_OPTIONS = [
    ["--revision", "main"], ["--host", "127.0.0.1"], ["--port", "8001"], ["--served-model-name", "my-model"],
    ["--api-key", "k"], ["--allowed-origins", '["http://a.example"]'], ["--disable-log-stats"], ["--enable-metrics"],
    ["--enable-payload-logging"], ["--chat-template", "{{ messages }}"], ["--chat-template-content-format", "openai"],
    ["--enable-auto-tool-choice"], ["--tool-call-parser", "hermes"], ["--reasoning-parser", "qwen3"],
    ["--response-role", "bot"], ["--structured-outputs-backend", "xgrammar"], ["-tp", "4"], ["-pp", "1"], ["-dp", "1"],
    ["--tensor-parallel-size", "8"], ["--pipeline-parallel-size", "1"], ["--data-parallel-size", "1"],
    ["--data-parallel-routing-policy", "round_robin"], ["-pb", "1:128", "1:256"], ["-db", "32:2048"],
    ["--prefill-buckets", "1:512"], ["--decode-buckets", "8:1024"], ["--max-prompt-len", "100"],
    ["--max-model-len", "128"], ["--max-batch-size", "8"], ["--min-batch-size", "1"], ["--devices", "cpu"],
    ["--device-mesh", "npu:0"], ["--scheduler-kind", "x"], ["--npu-queue-limit", "2"],
    ["--max-processing-samples", "64"], ["--spare-blocks-ratio", "0.1"], ["--estimation-time-limit-ms", "5"],
    ["--enable-prefix-caching"], ["--no-enable-prefix-caching"], ["--max-concurrency", "16"],
    ["--max-num-batched-tokens", "512"], ["--prefix-cache-lookahead-requests", "2"], ["--max-io-memory-mb", "1024"],
    ["--allowed-local-media-path", "/tmp"], ["--allowed-media-domains", "a.example"],
    ["--image-limit-per-prompt", "1"], ["--video-limit-per-prompt", "1"], ["--interleave-mm-strings"],
    ["--enable-responses-api-store"], ["--responses-api-store-max-entries", "10"], ["--responses-api-store-ttl", "60"],
    ["--uvicorn-log-level", "trace"], ["--disable-uvicorn-access-log"], ["--enable-jit-compilation"],
    ["--jit-threshold", "5"], ["--jit-max-workers", "15"], ["--jit-unit-size", "8"], ["--fxb", "x.fxb"],
    ["--enable-overlap-scheduling"], ["--no-enable-overlap-scheduling"], ["--speculative-model", "m2"],
    ["--num-speculative-tokens", "3"], ["-draft-tp", "4"], ["-draft-pp", "1"], ["-draft-dp", "1"],
    ["--npu-io-cpus", "0-3"],
]
HONOURED_WITHOUT_WARNING = {"--revision", "--host", "--port", "--served-model-name", "--api-key", "--allowed-origins",
                            "--disable-log-stats", "--enable-metrics", "--enable-payload-logging", "--chat-template",
                            "--chat-template-content-format", "--response-role", "-pp", "-dp",
                            "--pipeline-parallel-size", "--data-parallel-size", "--max-model-len",
                            "--max-batch-size", "--devices", "--npu-queue-limit", "--max-processing-samples",
                            "--spare-blocks-ratio", "--enable-prefix-caching", "--no-enable-prefix-caching",
                            "--max-concurrency", "--max-num-batched-tokens", "--uvicorn-log-level",
                            "--disable-uvicorn-access-log", "--enable-jit-compilation", "--jit-threshold",
                            "--jit-max-workers", "--jit-unit-size", "--fxb", "--enable-auto-tool-choice",
                            "--tool-call-parser", "--structured-outputs-backend"}


def serve_ns(*argv):
    from furiosa_llm.entrypoints.cli import parse_args
    from furiosa_llm.entrypoints.serve import resolve_serve_args

    return resolve_serve_args(parse_args(["serve", *argv]))


# ---- the command line ------------------------------------------------------------------------
def test_model_is_positional_and_model_flag_still_works():
    assert serve_ns("m").model == "m"
    assert serve_ns("--model", "m").model == "m"
    assert serve_ns("m", "--model", "m").model == "m"
    assert serve_ns("--enable-prefix-caching", "m").model == "m"  # a bare switch does not swallow MODEL
    assert serve_ns("--no-enable-prefix-caching", "m", "--devices", "cpu").model == "m"
    with pytest.raises(ValueError, match="no model"):
        serve_ns("--devices", "cpu")
    with pytest.raises(ValueError, match="given twice"):
        serve_ns("a", "--model", "b")


@pytest.mark.parametrize("argv,prefix,jit", [
    ([], True, False),
    (["--enable-prefix-caching"], True, False),
    (["--no-enable-prefix-caching"], False, False),
    (["--enable-prefix-caching", "false"], False, False),
    (["--enable-prefix-caching=false"], False, False),
    (["--enable-jit-compilation"], True, True),
    (["--enable-jit-compilation", "true"], True, True),
    (["--enable-jit-compilation", "false"], True, False),
    (["--no-enable-jit-compilation"], True, False),
])
def test_booleans_are_switches_with_no_forms_and_still_take_true_false(argv, prefix, jit):
    from furiosa_llm import AsyncEngineArgs

    ns = serve_ns("m", *argv)
    assert (ns.enable_prefix_caching, ns.enable_jit_compilation) == (prefix, jit)
    # the seed's parser (AsyncEngineArgs.add_cli_args, as examples/async_llm_engine.py uses it) takes the same forms
    p = AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    a = AsyncEngineArgs.from_cli_args(p.parse_args(["--model", "m", *argv]))
    assert (a.enable_prefix_caching, a.enable_jit_compilation) == (prefix, jit)


def test_parallel_short_forms():
    ns = serve_ns("m", "-pp", "2", "-dp", "3", "-tp", "8")
    assert (ns.pipeline_parallel_size, ns.data_parallel_size, ns.tensor_parallel_size) == (2, 3, 8)
    from furiosa_llm.entrypoints.cli import parse_args

    assert parse_args(["simulate", "--model", "llama-3.1-8b", "-tp", "4"]).tensor_parallel_size == 4


@pytest.mark.parametrize("option", FURIOSA_SERVE_OPTIONS, ids=lambda o: o[0])
def test_every_furiosa_serve_option_is_recognised(option):
    """Each option parses; one without effect here is named (by its long form) in one warning."""
    from furiosa_llm.entrypoints.cli import build_parser
    from furiosa_llm.entrypoints.serve import ignored_flag_warnings

    ns = serve_ns("m", *option)
    warnings = ignored_flag_warnings(ns)
    if option[0] in HONOURED_WITHOUT_WARNING:
        assert warnings == []
    else:
        serve = build_parser()._subparsers._group_actions[0].choices["serve"]
        long = "--" + serve._option_string_actions[option[0]].dest.replace("_", "-")
        assert len(warnings) == 1 and warnings[0].startswith(long + "=") and "ignored" in warnings[0], warnings


def test_honoured_options_map_onto_the_engine():
    ns = serve_ns("m", "--max-processing-samples", "64", "--max-concurrency", "16", "--max-batch-size", "32")
    assert ns.max_processing_samples == 16  # the smallest cap on the running set
    assert serve_ns("m", "--max-concurrency", "4").max_processing_samples == 4
    assert serve_ns("m").max_processing_samples is None
    assert serve_ns("m").allowed_origins == ["*"]
    assert serve_ns("m", "--allowed-origins", "*").allowed_origins == ["*"]
    assert serve_ns("m", "--allowed-origins", '["http://a", "http://b"]').allowed_origins == ["http://a", "http://b"]
    assert serve_ns("m", "--allowed-origins", "http://a,http://b").allowed_origins == ["http://a", "http://b"]
    assert serve_ns("m", "-tp", "1").tensor_parallel_size == 1
    with pytest.raises(SystemExit):
        serve_ns("m", "--max-concurrency", "0")
    with pytest.raises(ValueError, match="port"):
        serve_ns("m", "--port", "0")


def test_version_and_collect_env(capsys):
    from furiosa_llm import __version__
    from furiosa_llm.entrypoints.cli import main

    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"furiosa-llm {__version__}"
    assert main(["collect-env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["python"].startswith(sys.version.split()[0])
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert env["torch"]["version"] and "cuda" in env["torch"] and env["platform"] and env["devices"]["available"]
    assert main(["collect-env"]) == 0
    text = capsys.readouterr().out
    assert "packages.torch: " in text and "devices.available: " in text and "platform: " in text


# ---- the core's prefix-cache counters --------------------------------------------------------
def test_prefix_cache_hits_and_queries_are_counted_in_tokens():
    from fakes import FakeQueue

    from furiosa_llm.core import EngineCore, Request, Scheduler, SchedulerConfig

    for caching in (True, False):
        q = FakeQueue(1)
        core = EngineCore(Scheduler(SchedulerConfig(num_blocks=32, block_size=4, enable_prefix_caching=caching)), q,
                          clock=lambda: q.now)
        for rid in ("a", "b"):
            core.add_request(Request(rid, list(range(1, 14)), max_tokens=1, arrival_time=0.0))
            while core.has_unfinished():
                core.step()
        st = core.stats()
        assert (st.num_cached_tokens, st.num_prefix_cache_queries) == ((12, 26) if caching else (0, 0))


# ---- the metrics, on a stub engine -----------------------------------------------------------
def test_metric_series_are_furiosa_llms():
    from furiosa_llm.core.metrics import EngineStats, RequestMetrics
    from furiosa_llm.core.jit import JitStats
    from furiosa_llm.entrypoints.openai.metrics import ServerMetrics

    class Native:
        jit = None

        def stats(self):
            return EngineStats(num_running=2, num_waiting=1, num_kv_blocks_used=5, num_kv_blocks_total=20, num_steps=9,
                               num_preemptions=1, num_prompt_tokens_computed=30, num_cached_tokens=12,
                               num_generated_tokens=7, jit=self.jit, num_prefix_cache_queries=40)

    class Engine:
        native_engine = Native()

    m = ServerMetrics(Engine(), "my-model", leader_device="cpu", max_model_len=128, block_size=16,
                      enable_prefix_caching=True)
    m.observe(10, 5, "stop", RequestMetrics(arrival_time=0.0, first_token_time=0.5, last_token_time=1.4),
              max_tokens=16)
    m.aborted()
    text = m.render().decode()

    def value(name: str, **labels) -> float:
        """The one sample ``name`` whose labels include ``labels`` (model_name and leader_device always)."""
        want = {"model_name": "my-model", "leader_device": "cpu", **labels}
        found = []
        for lbl, v in re.findall(rf"^{re.escape(name)}{{([^}}]*)}} ([0-9.e+-]+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', lbl))
            if all(have.get(k) == str(x) for k, x in want.items()):
                found.append(float(v))
        assert len(found) == 1, f"{name}{labels}: {found} in\n{text}"
        return found[0]

    assert value("furiosa_llm_num_requests_running") == 2
    assert value("furiosa_llm_num_requests_waiting") == 1
    assert value("furiosa_llm_kv_cache_usage_percent") == 0.25
    assert value("furiosa_llm_prefix_cache_hits_total") == 12
    assert value("furiosa_llm_prefix_cache_queries_total") == 40
    assert value("furiosa_llm_prompt_tokens_total") == 30
    assert value("furiosa_llm_generation_tokens_total") == 7
    assert value("furiosa_llm_num_preemptions_total") == 1
    assert value("furiosa_llm_cache_config_info", block_size=16, num_gpu_blocks=20) == 1
    assert value("furiosa_llm_request_success_total", finished_reason="stop") == 1
    assert value("furiosa_llm_request_success_total", finished_reason="abort") == 1
    for h in ("request_prompt_tokens", "request_generation_tokens", "request_params_n", "request_params_max_tokens",
              "time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert value(f"furiosa_llm_{h}_count") == 1
    assert value("furiosa_llm_time_to_first_token_seconds_sum") == 0.5
    assert value("furiosa_llm_request_params_max_tokens_sum") == 16
    # inter-token latency: 4 intervals of (1.4 - 0.5) / 4, sum and count exact
    assert value("furiosa_llm_inter_token_latency_seconds_count") == 4
    assert value("furiosa_llm_inter_token_latency_seconds_sum") == pytest.approx(0.9)
    assert value("furiosa_llm_inter_token_latency_seconds_bucket", le="0.3") == 4
    assert value("furiosa_llm_inter_token_latency_seconds_bucket", le="0.2") == 0
    assert "furiosa_llm_wire_hit_rate" not in text  # JIT off
    assert not re.search(r"^furiosa_llm:", text, re.M)
    Engine.native_engine.jit = JitStats(steps_compiled=3, steps_slow=1, compilations_finished=2,
                                        compile_seconds_total=4.0)
    text = m.render().decode()
    assert value("furiosa_llm_wire_hit_rate") == 0.75
    assert value("furiosa_llm_jit_wire_compilation_time_seconds_sum") == 4.0


# ---- in-process: model card, tokenizer info, CORS, chat options, model defaults ---------------
@pytest.fixture
def client(async_engine):
    from furiosa_llm.entrypoints.openai.api_server import create_app

    def make(**kw):
        app = create_app(async_engine, served_model_name=MODEL, log_interval_s=0, **kw)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    return make


async def test_model_card_and_retrieve(client, async_engine):
    async with client() as c:
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"]
        assert card["max_context_len"] == card["max_model_len"] == async_engine.max_model_len
        assert card["max_prompt_len"] == async_engine.max_model_len - 1 and card["artifact_id"]
        rc = card["runtime_config"]
        assert rc["block_size"] == 16 and rc["num_kv_blocks"] == 512 and rc["prefill_buckets"] == []
        # the dtype ``auto`` resolved to, and the weight format
        assert rc["dtype"] in ("float32", "bfloat16", "float16") and rc["quantization"] == "none"
        one = await c.get(f"/v1/models/{MODEL}")
        assert one.status_code == 200 and one.json() == card
        missing = await c.get("/v1/models/no/such-model")
        assert missing.status_code == 404
        err = missing.json()["error"]
        assert err["code"] == "model_not_found" and "no/such-model" in err["message"] and err["type"]


async def test_tokenizer_info(client, async_engine):
    async with client() as c:
        info = (await c.get("/tokenizer_info")).json()
        assert info["tokenizer_class"] == type(async_engine.tokenizer).__name__
        assert info["chat_template"] == async_engine.tokenizer.chat_template
        assert info["eos_token"] == async_engine.tokenizer.eos_token
        assert info["model_max_length"] == async_engine.max_model_len


async def test_cors_from_allowed_origins(client):
    async with client(allowed_origins=["http://ok.example"]) as c:
        pre = await c.options("/v1/completions", headers={"Origin": "http://ok.example",
                                                          "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ok.example"
        bad = await c.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in bad.headers
    async with client(allowed_origins=["*"]) as c:
        r = await c.get("/v1/models", headers={"Origin": "http://any.example"})
        assert r.headers["access-control-allow-origin"] == "*"
    async with client() as c:  # create_app without allowed_origins: no CORS
        r = await c.get("/v1/models", headers={"Origin": "http://any.example"})
        assert "access-control-allow-origin" not in r.headers


async def test_response_role_and_content_format(client, async_engine):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2,
            "temperature": 0}
    async with client(response_role="bot") as c:
        r = (await c.post("/v1/chat/completions", json=body)).json()
        assert r["choices"][0]["message"]["role"] == "bot"
        lines = [ln async for ln in (await c.post("/v1/chat/completions", json={**body, "stream": True})).aiter_lines()]
        first = json.loads(lines[0].removeprefix("data: "))
        assert first["choices"][0]["delta"]["role"] == "bot"
    # "openai": the template gets the content as a list of parts
    parts = ("{% for m in messages %}{% for p in m['content'] %}<{{ p['type'] }}:{{ p['text'] }}>{% endfor %}"
             "{% endfor %}")
    tok = async_engine.tokenizer
    async with client(chat_template=parts, chat_template_content_format="openai") as c:
        ids = (await c.post("/tokenize", json={"messages": body["messages"]})).json()["tokens"]
        assert tok.decode(ids) == "<text:hi>"
    async with client(chat_template=parts) as c:  # "auto" detects the loop over the parts
        ids = (await c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()["tokens"]
        assert tok.decode(ids) == "<text:hi>"
    plain = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    async with client(chat_template=plain, chat_template_content_format="string") as c:
        ids = (await c.post("/tokenize", json={"messages": body["messages"]})).json()["tokens"]
        assert tok.decode(ids) == "[hi]"
    from furiosa_llm.entrypoints.openai.api_server import detect_content_format

    assert detect_content_format(tok.chat_template) == "string"
    with pytest.raises(ValueError, match="chat_template_content_format"):
        client(chat_template_content_format="xml")


async def test_the_models_sampling_defaults_apply_to_fields_a_request_leaves_out(client, async_engine, monkeypatch):
    """With the model's generation_config defaults on the engine (``get_diff_sampling_param()``), a
    request without sampling fields samples with those defaults; a field the request gives wins; a
    chat request without max_tokens gets the model's ``max_new_tokens`` when that is less."""
    monkeypatch.setattr(async_engine, "get_diff_sampling_param",
                        lambda: {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_tokens": 3}, raising=False)
    seen = []
    real = async_engine.generate

    def spy(prompt, params, request_id, *a, **kw):
        seen.append(params)
        return real(prompt, params, request_id, *a, **kw)

    monkeypatch.setattr(async_engine, "generate", spy)
    async with client() as c:
        await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0, "top_k": 3})
        await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert (seen[0].temperature, seen[0].top_p, seen[0].top_k, seen[0].max_tokens) == (0.6, 0.9, 50, 1)
    assert (seen[1].temperature, seen[1].top_p, seen[1].top_k) == (0.0, 0.9, 3)
    assert seen[2].max_tokens == 3 and seen[2].temperature == 0.6


# ---- the check: `furiosa-llm serve MODEL --no-enable-prefix-caching --allowed-origins '*'` ---------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_model_positional_no_prefix_caching_any_origin_serves_the_openai_client(tmp_path):
    import openai

    exe = shutil.which("furiosa-llm", path=os.path.dirname(sys.executable)) or shutil.which("furiosa-llm")
    assert exe, "the furiosa-llm console script is not installed"
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [exe, "serve", MODEL, "--no-enable-prefix-caching", "--allowed-origins", "*",
           "--devices", "cpu", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", CACHE_DIR,
           "--num-kv-blocks", "256", "--max-model-len", "256", "--seed", "0", "--tool-call-parser", "hermes"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY")
        assert [m.id for m in client.models.list()] == [MODEL]
        card = client.models.retrieve(MODEL)
        assert card.id == MODEL and card.model_extra["max_context_len"] == 256
        assert card.model_extra["runtime_config"]["enable_prefix_caching"] is False
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("other-model")
        done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                     max_tokens=6, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", temperature=-1)
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "http://anywhere.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        # the same prompt twice: no prefix-cache lookups with caching off
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0)
        text = httpx.get(f"{url}/metrics").text
        for name in ("furiosa_llm_num_requests_running", "furiosa_llm_num_requests_waiting",
                     "furiosa_llm_kv_cache_usage_percent", "furiosa_llm_prompt_tokens_total",
                     "furiosa_llm_generation_tokens_total", "furiosa_llm_request_success_total",
                     "furiosa_llm_time_to_first_token_seconds_bucket", "furiosa_llm_inter_token_latency_seconds_sum",
                     "furiosa_llm_e2e_request_latency_seconds_count", "furiosa_llm_request_prompt_tokens_count",
                     "furiosa_llm_request_generation_tokens_count", "furiosa_llm_request_params_n_count",
                     "furiosa_llm_request_params_max_tokens_count"):
            assert re.search(rf"^{name}{{", text, re.M), name
        m = re.search(r"^furiosa_llm_prefix_cache_queries_total{[^}]*} ([0-9.e+-]+)$", text, re.M)
        assert m and float(m.group(1)) == 0
        assert "--tool-call-parser" not in log.read_text()  # honoured: no "ignored" warning
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
