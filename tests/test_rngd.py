"""The rngd backend: knobs against the real furiosa-llm-native parser, discovery, artifact errors, and the
API over a fake native engine that follows the documented stream protocol (``tests/fakes_rngd.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import pytest

from fakes_rngd import MANIFEST, TINY_LLAMA_CONFIG, FakeNativeEngine, FakeSmi, FakeSmiDevice, make_artifact, write_fxb
from furiosa_llm import AsyncLLMEngine, EngineArgs, SamplingParams
from furiosa_llm.api.llm_engine import LLMEngine
from furiosa_llm.api.rngd_engine import RngdEngine
from furiosa_llm.api.sampling_params import RequestOutputKind
from furiosa_llm.hal import discovery
from furiosa_llm.hal.rngd import RngdUnavailableError, prepare
from furiosa_llm.hal.rngd_knobs import ENGINE_KNOBS, NATIVE_VERSION, open_native, translate


def smi_1_3():
    """Cards npu1 (all free) and npu3 (PEs 0-1 occupied)."""
    return FakeSmi(FakeSmiDevice(1), FakeSmiDevice(3, occupied=[0, 1]))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("rngd") / "tiny-llama")


def rngd(artifact, *, smi=None, **kw):
    native = {k: kw.pop(k) for k in ("reply", "step_s", "fail_ids", "fail_after", "tokens_per_item") if k in kw}
    kw.setdefault("devices", "npu:1")
    return RngdEngine(EngineArgs(model=str(artifact), **kw), native_factory=FakeNativeEngine.factory(**native),
                      smi=smi or smi_1_3())


# ---- discovery -------------------------------------------------------------------------------

def test_discovery_uses_card_names_core_num_and_core_status():
    cards = discovery.list_npu_cards(smi_1_3())
    assert [(c.index, c.num_pes, c.available) for c in cards] == [(1, 8, list(range(8))), (3, 8, [2, 3, 4, 5, 6, 7])]
    assert cards[0].memory_total_bytes == 48 * 2**30
    assert [str(d) for d in discovery.available_npu_devices(smi_1_3())] == ["npu:1", "npu:3:2-3", "npu:3:4-7"]
    assert [str(d) for d in discovery.default_devices(smi_1_3())] == ["npu:1", "npu:3:2-3", "npu:3:4-7"]
    small = FakeSmi(FakeSmiDevice(0, num_pes=4, occupied=[3]))
    assert [str(d) for d in discovery.available_npu_devices(small)] == ["npu:0:0-1", "npu:0:2"]


@pytest.mark.parametrize("spec,needle", [
    ("npu:0", "card npu0 not found; found: npu1, npu3)"),
    ("npu:3", "PE 0, 1 of npu3 occupied"),
    ("npu:3:0-3", "PE 0, 1 of npu3 occupied"),
    ("npu:3:1", "PE 1 of npu3 occupied"),
])
def test_asking_for_an_absent_or_occupied_pe_lists_what_is_free(spec, needle):
    from furiosa_llm.hal import parse_devices

    with pytest.raises(ValueError) as e:
        discovery.check_available(parse_devices(spec), smi_1_3())
    assert needle in str(e.value) and "free PEs: npu:1, npu:3:2-3, npu:3:4-7" in str(e.value)
    discovery.check_available(parse_devices("npu:1,npu:3:4-7,npu:3:2"), smi_1_3())


def test_omitted_devices_mean_the_available_pes(artifact):
    eng = rngd(artifact, devices=None)
    try:
        assert FakeNativeEngine.instances[-1].ctor["devices"] == "npu:1,npu:3:2-3,npu:3:4-7"
    finally:
        eng.shutdown()


# ---- knobs: one table, each field accepted by the real parser; refusals first -------------------

def _has_native() -> bool:
    try:
        import furiosa.llm_native.llm  # noqa: F401
    except ImportError:
        return False
    return True


# the real-wheel checks; CI installs the [rngd] extra (scripts/install.sh), so there they always run
needs_native = pytest.mark.skipif(not _has_native(), reason="needs the [rngd] extra (furiosa-llm-native)")


def real_open(cfg):
    """The real vendor constructor on ``cfg``: the error it ends with (there is no card here)."""
    from furiosa.llm_native.llm import NativeLLMEngine

    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        open_native(NativeLLMEngine, cfg)
    return str(e.value), time.monotonic() - t0


def test_every_knob_has_one_row_and_the_table_covers_engine_args():
    import dataclasses

    names = [k.name for k in ENGINE_KNOBS]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in dataclasses.fields(EngineArgs)}


@needs_native
@pytest.mark.parametrize("field,value", [
    ("max_processing_samples", 7), ("enable_prefix_caching", False), ("max_num_batched_tokens", 512),
    ("npu_queue_limit", 1), ("data_parallel_size", 1), ("pipeline_parallel_size", 1), ("max_model_len", 1024),
    ("devices", "npu:0"), ("devices", "npu:0,npu:1"),
])
def test_each_translated_field_is_accepted_by_the_real_parser(tmp_path, field, value):
    fxb = write_fxb(tmp_path / "m.fxb")
    args = EngineArgs(model=str(tmp_path), **{field: value})
    cfg = translate(args, devices=args.devices or "npu:0", fxb_path=str(fxb))
    msg, _ = real_open(cfg)
    # parsed and validated everything: it got as far as opening the device
    assert "librenegade.so" in msg, msg


@needs_native
def test_the_real_parser_refuses_what_the_table_guards(tmp_path):
    """The facts behind the table: the parser's own errors for the values we refuse or must fix."""
    args = EngineArgs(model=str(tmp_path))
    cfg = translate(args, devices="npu:0", fxb_path=str(write_fxb(tmp_path / "m.fxb")))
    cfg.scheduler["npu_queue_limit"] = 2
    assert "npu_queue_limit must be 1" in real_open(cfg)[0]
    cfg.scheduler["npu_queue_limit"] = 1
    cfg.scheduler["data_parallel_scoring_profile"] = None
    assert "expected value" in real_open(cfg)[0]
    cfg.scheduler["data_parallel_scoring_profile"] = "balanced"
    del cfg.scheduler["enable_npu_sampling"]
    assert "missing field `enable_npu_sampling`" in real_open(cfg)[0]


@pytest.mark.parametrize("field,value", [
    ("npu_queue_limit", 2), ("spare_blocks_ratio", 0.1), ("enable_jit_compilation", True), ("jit_threshold", 3),
    ("jit_max_workers", 2), ("jit_unit_size", 4), ("seed", 0), ("block_size", 32), ("num_kv_blocks", 10),
    ("kv_cache_memory_bytes", 10**9), ("dtype", "bfloat16"),
])
def test_refused_knobs_get_our_error_first(artifact, field, value):
    FakeNativeEngine.instances.clear()
    with pytest.raises(ValueError) as e:
        rngd(artifact, **{field: value})
    assert f"{field}={value!r}" in str(e.value) and NATIVE_VERSION in str(e.value)
    assert not FakeNativeEngine.instances  # never reached the vendor engine


@pytest.mark.parametrize("field,value", [("seed", 1), ("presence_penalty", 0.5), ("frequency_penalty", -0.5)])
def test_refused_sampling_knobs(artifact, field, value):
    eng = rngd(artifact)
    try:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}=.*{NATIVE_VERSION}"):
            eng.add_request("r", "hi", SamplingParams(**{field: value}))
        assert not eng.has_unfinished_requests()
    finally:
        eng.shutdown()


# ---- construction errors ----------------------------------------------------------------------

@needs_native
def test_real_wheel_reaches_device_open_and_says_no_driver(tmp_path):
    art = make_artifact(tmp_path / "m")
    smi = FakeSmi(FakeSmiDevice(0))  # a card as furiosa_smi would list it; the driver library is absent here
    t0 = time.monotonic()
    with pytest.raises(RngdUnavailableError) as e:
        RngdEngine(EngineArgs(model=str(art), devices="npu:0"), smi=smi)
    assert time.monotonic() - t0 < 1.0  # the vendor engine is opened before any slow loading (tokenizer)
    assert str(e.value).startswith("no RNGD driver") and "librenegade.so" in str(e.value)


def test_real_smi_on_a_host_without_a_card(artifact):
    pytest.importorskip("furiosa_smi")
    import furiosa_smi

    if furiosa_smi.list_devices():
        pytest.skip("this host has an RNGD card")
    with pytest.raises(RngdUnavailableError, match="finds no RNGD card on this host.*DeviceNotFoundError"):
        prepare(EngineArgs(model=str(artifact), devices="npu:0"))


@pytest.mark.parametrize("case,needle", [
    ("no_fxb", "no FXB bundle found"),
    ("two_fxb", "2 .fxb bundles"),
    ("not_zip", "not an FXB bundle (not a zip archive)"),
    ("arch", "config.json is a MistralForCausalLM but the FXB model.fxb was compiled for LlamaForCausalLM"),
    ("buckets", "compiles attention buckets up to 1024 tokens"),
    ("bucket_names", "compiles attention buckets up to 1024 tokens"),
    ("no_folder", "no such folder"),
])
def test_artifact_errors_are_actionable_and_fast(tmp_path, case, needle):

    kw = {}
    if case == "no_fxb":
        art = make_artifact(tmp_path / "m", fxb_name=None)
    elif case == "two_fxb":
        art = make_artifact(tmp_path / "m")
        write_fxb(art / "other.fxb")
    elif case == "not_zip":
        art = make_artifact(tmp_path / "m", fxb_name=None)
        (art / "model.fxb").write_text("not a zip")
    elif case == "arch":
        art = make_artifact(tmp_path / "m", config={**TINY_LLAMA_CONFIG, "architectures": ["MistralForCausalLM"]})
    elif case == "buckets":
        kernels = {"attn": {"bucket": {"attention": {"batch_size": 1, "attention_size": 1024, "kv_cache_size": 0}}}}
        art = make_artifact(tmp_path / "m", manifest={**MANIFEST, "kernels": kernels})
        kw["max_model_len"] = 2048
    elif case == "bucket_names":  # the vendor builder's bucket names: b<batch>_a<attention>_kv<kv>
        kernels = {"b1_a1024_kv0": {}, "b8_a512_kv0": {}}
        art = make_artifact(tmp_path / "m", manifest={**MANIFEST, "kernels": kernels})
        kw["max_model_len"] = 2048
    else:
        art = tmp_path / "missing"
    args = EngineArgs(model=str(art), devices="npu:1", **kw)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(needle)):
        prepare(args, smi=smi_1_3())
    assert time.monotonic() - t0 < 0.5


def test_the_bundle_is_found_in_the_vendor_cache(tmp_path):
    from types import SimpleNamespace

    from furiosa_llm.hal.rngd_artifact import find_fxb, from_cache

    art = make_artifact(tmp_path / "tiny-llama", fxb_name=None)
    cached = write_fxb(tmp_path / "cached.fxb")

    def entry(repo, arch="LlamaForCausalLM", missing=False, path=cached):
        return SimpleNamespace(repo_id=repo, architecture=arch, path=str(path), missing=missing)

    cfg = dict(TINY_LLAMA_CONFIG)
    assert find_fxb(art, None, cfg, lambda: [entry("org/other", "Qwen3ForCausalLM"), entry("org/tiny-llama")]) == cached
    assert from_cache(art, cfg, [entry("org/x"), entry("org/y", "Qwen3ForCausalLM")]) == cached  # the only Llama
    assert from_cache(art, cfg, [entry("org/x"), entry("org/y")]) is None  # ambiguous
    assert from_cache(art, cfg, [entry("org/tiny-llama", missing=True)]) is None
    with pytest.raises(ValueError, match=r"the local FXB cache has 1 bundle\(s\), none for this model"):
        find_fxb(art, None, cfg, lambda: [entry("org/y", "Qwen3ForCausalLM")])
    assert find_fxb(art, str(cached), cfg, lambda: []) == cached


# ---- the API over the fake native engine --------------------------------------------------------

def drain(eng):
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_llm_engine_output_kinds_and_lengths(artifact):
    eng = LLMEngine(rngd(artifact))
    try:
        eng.add_request("c", "hello", SamplingParams(max_tokens=7))
        eng.add_request("d", "hello", SamplingParams(max_tokens=7, output_kind=RequestOutputKind.DELTA))
        eng.add_request("f", "hello", SamplingParams(max_tokens=7, output_kind=RequestOutputKind.FINAL))
        outs = drain(eng)
        full = outs["c"][-1].outputs[0]
        assert full.text == " this is a test. this is" and full.finish_reason == "length" and len(full.token_ids) == 7
        assert len(outs["c"]) == 7 and "".join(o.outputs[0].text for o in outs["d"]) == full.text
        assert len(outs["f"]) == 1 and outs["f"][0].outputs[0].text == full.text
        assert outs["c"][-1].metrics.first_token_time is not None and outs["c"][-1].prompt == "hello"
        call = next(c for c in FakeNativeEngine.instances[-1].calls if c[1] == "c")
        assert call == ("stream_generate", "c", 1, 7)
    finally:
        eng.shutdown()


def test_stop_string_aborts_and_drains(artifact):
    eng = LLMEngine(rngd(artifact))
    try:
        eng.add_request("s", "hello", SamplingParams(max_tokens=50, stop=["test"]))
        outs = drain(eng)
        last = outs["s"][-1].outputs[0]
        assert last.text == " this is a " and last.finish_reason == "stop" and last.stop_reason == "test"
        assert ("abort_request", "s") in FakeNativeEngine.instances[-1].calls
        time.sleep(0.05)
        assert eng.step() == []  # what was still coming for "s" is dropped
    finally:
        eng.shutdown()


def test_stop_token_id_and_logprobs(artifact):
    eng = LLMEngine(rngd(artifact, tokens_per_item=2))
    try:
        eng.add_request("t", "hello", SamplingParams(max_tokens=50, stop_token_ids=[3231], logprobs=0))
        out = drain(eng)["t"][-1].outputs[0]
        assert out.token_ids == [2023, 2003, 1037, 3231] and out.finish_reason == "stop" and out.stop_reason == 3231
        assert out.text == " this is a" and len(out.logprobs) == 4 and out.logprobs[3][3231].logprob == -0.5
    finally:
        eng.shutdown()


def test_what_the_rngd_engine_refuses_per_request(artifact):
    from furiosa_llm import PoolingParams

    eng = rngd(artifact)
    try:
        with pytest.raises(ValueError, match="PoolingParams"):
            eng.add_request("p", "hi", PoolingParams())
        with pytest.raises(ValueError, match="exceeds max_model_len=2048"):
            eng.add_request("long", "hi", SamplingParams(max_tokens=4000))
        eng.add_request("dup", "hi", SamplingParams(max_tokens=3))
        with pytest.raises(ValueError, match="already has this id"):
            eng.add_request("dup", "hi", SamplingParams(max_tokens=3))
        assert eng.get_num_unfinished_requests() == 1 and drain(eng)["dup"][-1].finished
    finally:
        eng.shutdown()


def test_abort_fault_isolation_and_engine_death(artifact):
    eng = LLMEngine(rngd(artifact, fail_ids={"bad"}, step_s=lambda n: 0.005))
    try:
        eng.add_request("bad", "hello", SamplingParams(max_tokens=20))
        eng.add_request("good", "hello", SamplingParams(max_tokens=20))
        eng.add_request("gone", "hello", SamplingParams(max_tokens=20))
        [aborted] = eng.abort_request("gone")
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        outs = drain(eng)
        assert outs["bad"][-1].outputs[0].finish_reason == "error" and "planted failure" in outs["bad"][-1].error
        assert outs["good"][-1].outputs[0].finish_reason == "length" and len(outs["good"][-1].outputs[0].token_ids) == 20
        assert "gone" not in outs and ("abort_request", "gone") in FakeNativeEngine.instances[-1].calls
        eng.add_request("late", "hello", SamplingParams(max_tokens=1000))
        FakeNativeEngine.instances[-1].kill()
        from furiosa_llm.api.native_engine import EngineDeadError

        got = []
        with pytest.raises(EngineDeadError):
            for _ in range(200):
                got += eng.step()
        assert got and got[-1].outputs[0].finish_reason == "error" and not eng.is_alive()
    finally:
        eng.shutdown()


async def test_async_engine_streams_and_cancelled_consumer(artifact):
    engine = AsyncLLMEngine(rngd(artifact, step_s=lambda n: 0.002))
    try:
        texts = [o.outputs[0].text async for o in engine.generate(
            "hi", SamplingParams(max_tokens=5, output_kind=RequestOutputKind.DELTA), "a1")]
        assert "".join(texts) == " this is a test."

        async def consume_two():
            n = 0
            async with contextlib.aclosing(engine.generate("hi", SamplingParams(max_tokens=1000), "a2")) as gen:
                async for _ in gen:
                    n += 1
                    if n == 2:
                        break

        await consume_two()
        assert ("abort_request", "a2") in FakeNativeEngine.instances[-1].calls
        assert not engine.native_engine.has_unfinished_requests()
        outs = await asyncio.gather(*[
            _final(engine, f"p{i}", SamplingParams(max_tokens=3 + i)) for i in range(4)])
        assert [len(o.outputs[0].token_ids) for o in outs] == [3, 4, 5, 6]
    finally:
        engine.shutdown()


async def _final(engine, rid, params):
    last = None
    async for o in engine.generate("hi", params, rid):
        last = o
    return last


def test_server_streams_from_the_fake_engine(artifact):
    from fastapi.testclient import TestClient

    from furiosa_llm.entrypoints.openai.api_server import create_app

    engine = AsyncLLMEngine(rngd(artifact, step_s=lambda n: 0.002), model_path=str(artifact))
    app = create_app(engine, served_model_name="tiny", log_interval_s=0)
    try:
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5, "stream": True})
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            assert "".join(c["choices"][0]["text"] for c in chunks) == " this is a test."
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 50,
                                                     "stop": ["test"]})
            assert r.json()["choices"][0]["text"] == " this is a " and r.json()["choices"][0]["finish_reason"] == "stop"
            metrics = client.get("/metrics").text
            assert 'leader_device="npu:1"' in metrics and "furiosa_llm_generation_tokens_total" in metrics
            assert client.get("/health").status_code == 200
    finally:
        engine.shutdown()


# ---- through the public entry points (LLM, the calibrate command) with the fakes patched in ----------

@pytest.fixture
def fake_wheels(monkeypatch):
    """``furiosa_smi`` and ``NativeLLMEngine`` replaced by the fakes where the backend looks them up."""
    import furiosa_llm.hal.rngd as rngd_mod

    state = {"kw": {}}
    monkeypatch.setattr(discovery, "_smi", smi_1_3)
    monkeypatch.setattr(rngd_mod, "native_factory", lambda: FakeNativeEngine.factory(**state["kw"]))
    return state


def test_llm_runs_on_rngd_through_the_seam(artifact, fake_wheels):
    from furiosa_llm import LLM

    llm = LLM(str(artifact), devices="npu:3:4-7", fxb=str(artifact / "model.fxb"))
    try:
        assert type(llm.engine).__name__ == "RngdEngine"
        out = llm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)
        assert out.outputs[0].text == " this is a test"
        assert FakeNativeEngine.instances[-1].ctor["devices"] == "npu:3:4-7"
    finally:
        llm.shutdown() if hasattr(llm, "shutdown") else llm.engine.shutdown()


def test_fxb_on_cpu_is_refused():
    from furiosa_llm.api.native_engine import NativeEngine

    with pytest.raises(ValueError, match="fxb='x.fxb': an FXB bundle runs only on RNGD"):
        NativeEngine(EngineArgs(model="smollm2-135m-instruct", devices="cpu", fxb="x.fxb"))


def test_calibrate_command_fits_the_cost_model_from_the_stream(artifact, fake_wheels, tmp_path):
    """The fake's step costs 4 ms + 1 ms per request in flight: the fitted profile must see decode time grow with
    the batch and put a batch of 8 near 12 ms (machine shared and noisy: a wide band)."""
    from furiosa_llm.entrypoints.cli import main

    fake_wheels["kw"] = {"step_s": lambda active: 0.004 + 0.001 * active}
    out = tmp_path / "rngd.json"
    rc = main(["calibrate", "--model", str(artifact), "--devices", "npu:1", "--batch-sizes", "1,4,8",
               "--prompt-lens", "16,64", "--decode-tokens", "6", "--out", str(out)])
    assert rc == 0
    from furiosa_llm.hal.cost_model import load_profile
    from furiosa_llm.sim.calibrate import _decode_shape

    cost, shape = load_profile(out)
    assert cost.name.startswith("rngd-npu:1") and cost.notes["furiosa_llm_native"] == NATIVE_VERSION
    t1, t8 = cost.device_time(shape, _decode_shape(1, 20)), cost.device_time(shape, _decode_shape(8, 20))
    assert t8 > t1 and 0.006 < t8 < 0.03, (t1, t8)
    # the simulator on that profile (the KV capacity is the vendor's: given by hand) predicts the fake's
    # decode time: 4 ms + 1 ms per request in flight, a few in flight at this rate
    sim = tmp_path / "sim.json"
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    assert main(["simulate", "--model", str(tmp_path / "config.json"), "--profile", str(out), "--devices", "npu:0",
                 "--num-kv-blocks", "4096", "--num-requests", "100", "--request-rate", "20", "--input-len", "fixed:32",
                 "--output-len", "fixed:16", "--no-progress", "--out", str(sim)]) == 0
    tpot = json.loads(sim.read_text())["metrics"]["median_tpot_ms"]
    assert 4.0 < tpot < 15.0, tpot


def test_server_client_disconnect_aborts_the_native_request(artifact):
    """A real HTTP server (uvicorn in a thread) over the fake engine: a client that leaves mid-stream
    aborts its native request; the others finish."""
    import socket
    import threading

    import httpx
    import uvicorn

    from furiosa_llm.entrypoints.openai.api_server import create_app

    engine = AsyncLLMEngine(rngd(artifact, step_s=lambda n: 0.01), model_path=str(artifact))
    fake = FakeNativeEngine.instances[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, served_model_name="tiny", log_interval_s=0),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)

        async def one(leave: bool):
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 300 if leave else 6, "stream": True}
            text, events = "", 0
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        events += 1
                        text += json.loads(line[6:])["choices"][0]["text"]
                        if leave and events >= 2:
                            return None
            return text

        results = asyncio.run(_gather([one(True), one(False), one(False)]))
        assert results[0] is None and results[1] == results[2] == " this is a test. this"
        for _ in range(100):
            if not fake.active and not engine.native_engine.has_unfinished_requests():
                break
            time.sleep(0.05)
        assert not fake.active and not engine.native_engine.has_unfinished_requests()
        assert sum(1 for c in fake.calls if c[0] == "abort_request") == 1
        assert fake.tokens_out < 100  # the leaver did not run to its 300 tokens
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


async def _gather(coros):
    return await asyncio.gather(*coros)


async def test_from_engine_args_builds_the_rngd_engine(artifact, fake_wheels):
    """``AsyncLLMEngine.from_engine_args`` (what ``furiosa-llm serve`` calls) and ``LLMEngine(args)`` on RNGD devices."""
    from furiosa_llm import AsyncEngineArgs

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=str(artifact), devices="npu:1"))
    try:
        assert type(engine.native_engine).__name__ == "RngdEngine" and engine.max_model_len == 2048
        last = await _final(engine, "x", SamplingParams(max_tokens=3))
        assert last.outputs[0].text == " this is a"
    finally:
        engine.shutdown()
    sync = LLMEngine(EngineArgs(model=str(artifact), devices="npu:3:4-7"))
    try:
        sync.add_request("y", "hi", SamplingParams(max_tokens=2))
        assert drain(sync)["y"][-1].outputs[0].text == " this is"
    finally:
        sync.shutdown()
