"""Furiosa-LLM conformance of ``LLM``, ``LLMEngine`` and ``AsyncLLMEngine``: each item called the way a
Furiosa-LLM program calls it (issue 16), on the embedded model."""

import asyncio
import inspect
import json
from pathlib import Path

import pytest

from furiosa_llm import LLM, AsyncLLMEngine, LLMEngine, PoolingParams, RequestOutput, SamplingParams
from furiosa_llm.api import SchedulerConfig

from conftest import CACHE_DIR, MODEL

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
SEED_SHAPE = ["native_engine", "tokenizer", "task_type", "max_model_len", "llm", "model_path", "trust_remote_code"]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(MODEL, devices=["cpu"], cache_dir=CACHE_DIR, num_kv_blocks=64, max_model_len=512, seed=0,
              served_model_name="smol", max_io_memory_mb=4096, structured_outputs_backend="xgrammar",
              scheduler_config=SchedulerConfig(npu_queue_limit=2, max_processing_samples=8, spare_blocks_ratio=0.1),
              logger_config=None, trust_remote_code=False)
    yield llm
    llm.shutdown()


def idle(llm) -> bool:
    e = llm.engine
    return not e.has_unfinished_requests() and e.num_free_blocks == e.num_total_blocks


# ---- LLM(...) -------------------------------------------------------------------------------------

def test_llm_takes_furiosa_keywords(llm):
    assert llm.model_id_or_path == MODEL and llm.served_model_name == "smol"
    assert llm.structured_outputs_backend == "xgrammar" and llm.max_model_len == 512
    assert llm.tokenizer is llm.engine.tokenizer and llm.get_tokenizer() is llm.tokenizer
    cfg = llm.engine.engine_config  # the scheduler_config reached the engine
    assert cfg.npu_queue_limit == 2 and cfg.scheduler_config.max_processing_samples == 8
    assert cfg.scheduler_config.spare_blocks_ratio == 0.1
    params = list(inspect.signature(LLM).parameters)
    for name in ("model_id_or_path", "fxb", "revision", "devices", "data_parallel_size", "pipeline_parallel_size",
                 "max_io_memory_mb", "max_model_len", "scheduler_config", "logger_config",
                 "structured_outputs_backend", "tokenizer", "tokenizer_mode", "seed", "served_model_name"):
        assert name in params


@pytest.mark.parametrize("kw,match", [
    (dict(fxb="model.fxb"), "fxb='model.fxb': an FXB bundle runs only on RNGD"),
    (dict(num_speculative_tokens=4), "speculative"),
    (dict(kv_transfer_config={"kv_role": "kv_producer"}), "kv_transfer_config"),
    (dict(structured_outputs_backend="outlines"), "structured_outputs_backend"),
    (dict(no_such_option=1), "no_such_option"),
    (dict(npu_queue_limit=3, scheduler_config=SchedulerConfig(npu_queue_limit=2)), "npu_queue_limit"),
    (dict(scheduler_config={"npu_queue_limit": 2}), "scheduler_config"),
    (dict(num_blocks_per_pp_stage=[8, 8]), "num_blocks_per_pp_stage"),
])
def test_llm_refuses_what_it_cannot_honour_before_loading(kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(MODEL, devices="cpu", cache_dir=CACHE_DIR, **kw)


# ---- generate ---------------------------------------------------------------------------------------

def test_generate_one_prompt_gives_one_output_a_list_gives_a_list(llm):
    one = llm.generate("The sky is", GREEDY, use_tqdm=False)
    assert isinstance(one, RequestOutput) and one.finished and one.prompt == "The sky is"
    many = llm.generate(["The sky is", {"prompt": "Hello"}], GREEDY, use_tqdm=False)
    assert isinstance(many, list) and len(many) == 2 and many[0].outputs[0].text == one.outputs[0].text
    assert isinstance(llm.generate({"prompt": "Hello"}, GREEDY, use_tqdm=False), RequestOutput)
    ids = llm.tokenizer.encode("The sky is", add_special_tokens=False)
    by_ids = llm.generate(prompt_token_ids=ids, sampling_params=GREEDY, use_tqdm=False)
    assert isinstance(by_ids, RequestOutput) and by_ids.outputs[0].token_ids == one.outputs[0].token_ids
    both = llm.generate(prompt_token_ids=[ids, ids], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in both] == [one.outputs[0].token_ids] * 2
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate("x", GREEDY, prompt_token_ids=ids)
    assert idle(llm)


def test_generate_passes_tokenizer_kwargs(llm):
    plain = llm.generate("Hi", GREEDY, use_tqdm=False)
    special = llm.generate("Hi", GREEDY, tokenizer_kwargs={"add_special_tokens": True}, use_tqdm=False)
    expected = llm.tokenizer("Hi", add_special_tokens=True)["input_ids"]
    assert special.prompt_token_ids == expected and special.prompt == "Hi"
    assert plain.prompt_token_ids == llm.tokenizer.encode("Hi", add_special_tokens=False)


def test_default_sampling_params_without_generation_config(llm):
    # the embedded model's generation_config sets no sampling field: plain defaults
    assert llm.get_default_sampling_params() == SamplingParams()
    assert LLMEngine.from_llm(llm).get_default_sampling_params() == SamplingParams()


# ---- stream_generate --------------------------------------------------------------------------------

async def test_stream_generate_yields_the_text_piece_by_piece(llm):
    final = llm.generate("The sky is", GREEDY, use_tqdm=False).outputs[0].text
    pieces = [p async for p in llm.stream_generate("The sky is", GREEDY)]
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces) and "".join(pieces) == final
    # a consumer that stops early aborts the request and frees its blocks
    gen = llm.stream_generate("Write a long story", SamplingParams(max_tokens=200, ignore_eos=True))
    assert await gen.__anext__()
    await gen.aclose()
    for _ in range(100):
        if idle(llm):
            break
        await asyncio.sleep(0.02)
    assert idle(llm)
    with pytest.raises(ValueError, match="one prompt"):
        async for _ in llm.stream_generate(["a", "b"], GREEDY):
            pass


def test_generate_works_after_streaming(llm):
    assert llm.generate(["Hello"], GREEDY, use_tqdm=False)[0].finished


# ---- chat ---------------------------------------------------------------------------------------------

def test_chat_in_furiosa_parameter_order(llm):
    names = list(inspect.signature(LLM.chat).parameters)[1:9]
    assert names == ["messages", "sampling_params", "chat_template", "chat_template_content_format",
                     "add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs"]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! I am"}]
    # positional, as a Furiosa-LLM caller may write it: continue the assistant's message
    out = llm.chat(conv, GREEDY, None, "string", False, True)
    assert isinstance(out, list) and len(out) == 1 and out[0].finished
    prompt = llm.tokenizer.decode(out[0].prompt_token_ids)
    assert prompt.endswith("Hello! I am")  # continued, not closed and reopened
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(conv, GREEDY, continue_final_message=True)  # add_generation_prompt defaults to True
    template = ("{% for t in tools %}TOOL:{{ t['function']['name'] }}\n{% endfor %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}], GREEDY,
                   chat_template=template, tools=tools)
    assert llm.tokenizer.decode(out[0].prompt_token_ids) == "TOOL:get_weather\nuser: Weather?\nassistant:"
    # default sampling params when none are given; a list of conversations gives a list
    assert len(llm.chat([[{"role": "user", "content": "Hi"}]] * 2, SamplingParams(max_tokens=2))) == 2


# ---- LLMEngine / AsyncLLMEngine ---------------------------------------------------------------------

def test_engines_have_the_seed_constructor_shape():
    for cls in (LLMEngine, AsyncLLMEngine):
        assert list(inspect.signature(cls).parameters)[:7] == SEED_SHAPE, cls


def test_llm_engine_from_llm_request_ids_and_add_request(llm):
    engine = LLMEngine.from_llm(llm)
    assert engine.native_engine is llm.engine and engine.llm is llm and engine.model_path == MODEL
    engine.add_request("r1", "The sky is", GREEDY)
    engine.add_request("r2", {"prompt_token_ids": [1, 2, 3]}, params=SamplingParams(max_tokens=2))
    assert engine.request_ids == {"r1", "r2"}
    with pytest.raises(ValueError, match="PoolingParams"):
        engine.add_request("r3", "Hello", PoolingParams())
    assert engine.request_ids == {"r1", "r2"}
    engine.abort_request("r2")
    assert engine.request_ids == {"r1"}
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert set(finals) == {"r1"} and engine.request_ids == set()
    assert idle(llm)


async def test_raw_constructors_over_the_native_engine(llm):
    native = llm.engine
    sync = LLMEngine(native, native.tokenizer, "generate", native.max_model_len, None, MODEL, False)
    assert sync.max_model_len == llm.max_model_len and sync.task_type == "generate"
    sync.add_request("s1", "Hello", GREEDY)
    while sync.has_unfinished_requests():
        sync.step()
    eng = AsyncLLMEngine(native, native.tokenizer, "generate", native.max_model_len, llm=llm)
    assert eng.model_path == MODEL and eng.get_default_sampling_params() == llm.get_default_sampling_params()
    outs = [o async for o in eng.generate("Hello", GREEDY, "a1")]
    assert outs[-1].finished and outs[-1].outputs[0].text
    with pytest.raises(ValueError, match="PoolingParams"):
        async for _ in eng.generate("Hello", PoolingParams(), "a2"):
            pass
    assert eng.request_ids == set()
    from_llm = AsyncLLMEngine.from_llm(llm)
    assert from_llm.native_engine is native and from_llm.max_model_len == llm.max_model_len


# ---- generation_config defaults, context manager --------------------------------------------------------

def test_generation_config_defaults_apply_without_sampling_params(llm, tmp_path):
    converted = next(Path(CACHE_DIR, "converted").glob("SmolLM2-135M-Instruct*"))
    model_dir = tmp_path / "smol-with-defaults"
    model_dir.mkdir()
    for f in converted.iterdir():
        if f.name != "generation_config.json":
            (model_dir / f.name).symlink_to(f)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
           "repetition_penalty": 1.1, "max_new_tokens": 3}
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    with LLM(str(model_dir), devices="cpu", cache_dir=CACHE_DIR, num_kv_blocks=64, seed=0) as custom:
        d = custom.get_default_sampling_params()
        assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens) == (0.6, 0.9, 20, 1.1, 3)
        assert LLMEngine.from_llm(custom).get_default_sampling_params() == d
        assert AsyncLLMEngine.from_llm(custom).get_default_sampling_params() == d
        out = custom.generate("Once upon a time", use_tqdm=False)  # no SamplingParams: the model's defaults
        c = out.outputs[0]
        assert len(c.token_ids) == 3 or (len(c.token_ids) < 3 and c.finish_reason == "stop")
        explicit = custom.generate("Once upon a time", SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
        assert len(explicit.outputs[0].token_ids) == 5  # given SamplingParams win whole
    assert not custom.engine.is_alive()  # the context manager shut it down
