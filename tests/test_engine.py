"""Lifecycle and behaviour of the real engine on the embedded model."""

import asyncio

import pytest

from furiosa_llm import (AsyncEngineDeadError, AsyncLLMEngine, PromptTooLongError, RequestFailedError, RequestOutputKind,
                         SamplingParams)

from conftest import engine_args

GREEDY = dict(temperature=0.0)


async def collect(engine, prompt, params, rid):
    outs = []
    async for o in engine.generate(prompt, params, rid):
        outs.append(o)
    return outs


def all_free(engine):
    n = engine.native_engine
    return n.num_free_blocks == n.num_total_blocks and not n.has_unfinished_requests()


async def wait_idle(engine):
    for _ in range(200):
        if all_free(engine):
            return True
        await asyncio.sleep(0.02)
    return all_free(engine)


async def test_still_serves(async_engine):
    outs = await collect(async_engine, "Hello", SamplingParams(max_tokens=4, **GREEDY), "ok-1")
    assert outs[-1].finished and outs[-1].outputs[0].text
    m = outs[-1].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


@pytest.mark.parametrize(
    "prompt,params,rid,match",
    [
        (123, SamplingParams(), "bad-1", "prompt"),
        ({"text": "x"}, SamplingParams(), "bad-2", "prompt"),
        ({"prompt_token_ids": [1, 10**9]}, SamplingParams(), "bad-3", "vocabulary"),
        ("", SamplingParams(), "bad-4", "empty"),
        ("hi", "not params", "bad-5", "sampling_params"),
        ("hi", SamplingParams(), 42, "request_id"),
    ],
)
async def test_bad_input_then_still_serves(async_engine, prompt, params, rid, match):
    with pytest.raises(ValueError, match=match):
        await collect(async_engine, prompt, params, rid)
    await test_still_serves(async_engine)
    assert await wait_idle(async_engine)


async def test_prompt_too_long_gives_numbers(async_engine):
    limit = async_engine.max_model_len
    with pytest.raises(PromptTooLongError, match=rf"exceeds max_model_len={limit}"):
        await collect(async_engine, {"prompt_token_ids": [5] * limit}, SamplingParams(max_tokens=1), "long")
    with pytest.raises(ValueError, match="max_tokens=64"):
        await collect(async_engine, {"prompt_token_ids": [5] * (limit - 10)}, SamplingParams(max_tokens=64), "long2")
    await test_still_serves(async_engine)


async def test_duplicate_live_request_id(async_engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY)
    gen = async_engine.generate("Tell me a story", params, "dup")
    first = await gen.__anext__()
    with pytest.raises(ValueError, match="dup"):
        await collect(async_engine, "Other", params, "dup")
    rest = [o async for o in gen]
    assert (rest or [first])[-1].finished
    assert len((rest or [first])[-1].outputs[0].token_ids) == 40
    assert await wait_idle(async_engine)


async def test_abort_frees_blocks_and_ends_stream(async_engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY)
    seen = []

    async def consume():
        async for o in async_engine.generate("Count to a thousand:", params, "ab-1"):
            seen.append(o)

    task = asyncio.create_task(consume())
    while not seen:
        await asyncio.sleep(0.01)
    await async_engine.abort("ab-1")
    await asyncio.wait_for(task, 10)
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    await async_engine.abort("ab-1")  # unknown id now: harmless
    assert await wait_idle(async_engine)


async def test_consumer_that_stops_iterating_frees_blocks(async_engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY)
    gen = async_engine.generate("Once upon a time", params, "stop-early")
    async for o in gen:
        break
    await gen.aclose()
    assert "stop-early" not in async_engine.request_ids
    assert await wait_idle(async_engine)

    async def consume():
        async for _ in async_engine.generate("Once upon a time", params, "cancelled"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_idle(async_engine)


async def test_output_kinds(async_engine):
    p = "List three colors:"
    base = dict(max_tokens=12, ignore_eos=True, **GREEDY)
    cum = await collect(async_engine, p, SamplingParams(**base), "k-c")
    delta = await collect(async_engine, p, SamplingParams(output_kind=RequestOutputKind.DELTA, **base), "k-d")
    final = await collect(async_engine, p, SamplingParams(output_kind=RequestOutputKind.FINAL, **base), "k-f")
    text = cum[-1].outputs[0].text
    assert len(cum) > 1 and len(final) == 1
    assert final[0].outputs[0].text == text
    assert "".join(o.outputs[0].text for o in delta) == text
    assert sum((o.outputs[0].token_ids for o in delta), []) == cum[-1].outputs[0].token_ids


async def test_stop_strings_and_stop_tokens(async_engine):
    base = dict(max_tokens=30, ignore_eos=True, **GREEDY)
    ref = (await collect(async_engine, "1, 2, 3, 4,", SamplingParams(**base), "s-ref"))[-1].outputs[0]
    assert "7" in ref.text
    stopped = await collect(async_engine, "1, 2, 3, 4,", SamplingParams(stop=["7"], **base), "s-1")
    out = stopped[-1].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "7"
    assert out.text == ref.text[: ref.text.index("7")]
    assert all("7" not in o.outputs[0].text for o in stopped)  # held back while streaming
    incl = (await collect(async_engine, "1, 2, 3, 4,", SamplingParams(stop="7", include_stop_str_in_output=True, **base), "s-2"))[-1]
    assert incl.outputs[0].text.endswith("7")
    tok = ref.token_ids[3]
    by_tok = (await collect(async_engine, "1, 2, 3, 4,", SamplingParams(stop_token_ids=[tok], **base), "s-3"))[-1]
    assert by_tok.outputs[0].stop_reason == tok and by_tok.outputs[0].token_ids[-1] == tok
    mn = (await collect(async_engine, "1, 2, 3, 4,", SamplingParams(stop_token_ids=[tok], min_tokens=10, **base), "s-4"))[-1]
    assert len(mn.outputs[0].token_ids) >= 10


async def test_eos_ends_unless_ignored(async_engine):
    msgs = [{"role": "user", "content": "Say hi."}]
    ids = async_engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out = (await collect(async_engine, {"prompt_token_ids": ids}, SamplingParams(max_tokens=64, **GREEDY), "eos-1"))[-1]
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) < 64
    ign = (await collect(async_engine, {"prompt_token_ids": ids}, SamplingParams(max_tokens=64, ignore_eos=True, **GREEDY), "eos-2"))[-1]
    assert ign.outputs[0].finish_reason == "length" and len(ign.outputs[0].token_ids) == 64


async def test_seeded_sampling_is_reproducible_and_logprobs(async_engine):
    params = dict(temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1,
                  presence_penalty=0.2, frequency_penalty=0.2, seed=1234, max_tokens=16, ignore_eos=True, logprobs=3)
    a, b = await asyncio.gather(
        collect(async_engine, "Tell me a joke", SamplingParams(**params), "seed-a"),
        collect(async_engine, "Tell me a joke", SamplingParams(**params), "seed-b"),
    )
    oa, ob = a[-1].outputs[0], b[-1].outputs[0]
    assert oa.token_ids == ob.token_ids
    assert len(oa.logprobs) == 16
    for tok, lp in zip(oa.token_ids, oa.logprobs):
        assert tok in lp and lp[tok].logprob <= 0 and 3 <= len(lp) <= 4
    pl = (await collect(async_engine, "The sky is blue", SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY), "plp"))[-1]
    assert pl.prompt_logprobs[0] is None and len(pl.prompt_logprobs) == len(pl.prompt_token_ids)
    assert all(pl.prompt_token_ids[i] in pl.prompt_logprobs[i] for i in range(1, len(pl.prompt_token_ids)))


async def test_encode_is_a_clear_error(async_engine):
    with pytest.raises(ValueError, match="generative"):
        async_engine.encode("hi", None, "enc")


async def test_failed_step_ends_only_its_batch_and_the_engine_serves_on():
    engine = AsyncLLMEngine.from_engine_args(engine_args(num_kv_blocks=64, max_processing_samples=1))
    runner = engine.native_engine.runner
    real_execute = runner.execute

    def fail_once(batch):
        runner.execute = real_execute
        raise RuntimeError("device fell over")

    params = SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY)
    first = asyncio.create_task(collect(engine, "hello", params, "f-a"))
    await asyncio.sleep(0.2)  # f-a is running; f-b waits (one request runs at a time)
    second = asyncio.create_task(collect(engine, "hello", params, "f-b"))
    runner.execute = fail_once
    with pytest.raises(RequestFailedError, match="device fell over") as info:
        await asyncio.wait_for(first, 20)
    assert info.value.request_id == "f-a"
    outs = await asyncio.wait_for(second, 30)
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 30
    assert not engine.errored
    await engine.check_health()
    assert await wait_idle(engine)
    engine.shutdown()


async def test_repeated_step_failures_reach_every_stream_and_mark_dead():
    engine = AsyncLLMEngine.from_engine_args(engine_args(num_kv_blocks=64, max_processing_samples=1))
    runner = engine.native_engine.runner

    def boom(batch):
        raise RuntimeError("device fell over")

    params = SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY)
    runner.execute = boom
    streams = [asyncio.create_task(collect(engine, "hello", params, f"e{i}")) for i in range(5)]
    errors = []
    for t in streams:
        with pytest.raises((RequestFailedError, AsyncEngineDeadError)) as info:
            await asyncio.wait_for(t, 10)
        errors.append(type(info.value))
    # one request per failing step until the fault repeats; then every stream hears the engine died
    assert errors == [RequestFailedError] * 2 + [AsyncEngineDeadError] * 3
    assert engine.errored
    with pytest.raises(AsyncEngineDeadError):
        await engine.check_health()
    with pytest.raises(AsyncEngineDeadError):
        await collect(engine, "again", params, "e-after")
    engine.shutdown()


async def test_a_retried_poison_request_does_not_kill_the_engine():
    """A client that retries a request which breaks every step it is in: the device passes its probe, so the engine lives."""
    engine = AsyncLLMEngine.from_engine_args(engine_args(num_kv_blocks=64))
    runner = engine.native_engine.runner
    real_execute = runner.execute
    poison = set(engine.tokenizer.encode(" xyzzy", add_special_tokens=False))

    def fails_on_poison(batch):
        if any(poison & set(s.token_ids) for s in batch.sequences):
            raise RuntimeError("device fault on this input")
        return real_execute(batch)

    runner.execute = fails_on_poison
    params = SamplingParams(max_tokens=3, **GREEDY)
    for attempt in range(5):  # more tries than the failures that trigger a probe
        with pytest.raises(RequestFailedError, match="device fault"):
            await asyncio.wait_for(collect(engine, "say xyzzy", params, f"poison-{attempt}"), 20)
    assert not engine.errored
    outs = await asyncio.wait_for(collect(engine, "Hello", params, "after-poison"), 20)
    assert outs[-1].outputs[0].finish_reason == "length"
    assert await wait_idle(engine)
    engine.shutdown()


async def test_a_request_whose_logits_are_not_finite_fails_alone():
    """NaN logits (a model's numbers overflowing) used to sample token 0 in silence; now that request ends with an
    error while the others in its batches finish, and the engine goes on (found by a fresh user with w8a16 +
    float16, whose overflow is fixed)."""
    import torch

    engine = AsyncLLMEngine.from_engine_args(engine_args(num_kv_blocks=64))
    runner = engine.native_engine.runner
    real_execute, real_head = runner.execute, runner.head_fn
    current = {}

    def execute(batch):
        current["batch"] = batch
        return real_execute(batch)

    def head(h):  # the logits of the "nan" request's rows are NaN
        logits = real_head(h)
        sampled = [c for c in current["batch"].sequences if c.sample]
        if len(sampled) == logits.shape[0]:
            for i, c in enumerate(sampled):
                if c.request_id == "nan":
                    logits[i] = float("nan")
        return logits

    runner.execute, runner.head_fn = execute, head
    params = SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY)
    bad = asyncio.create_task(collect(engine, "Hello there", params, "nan"))
    good = asyncio.create_task(collect(engine, "The sky is", params, "fine"))
    with pytest.raises(RequestFailedError, match="not finite"):
        await asyncio.wait_for(bad, 20)
    outs = await asyncio.wait_for(good, 20)
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 6
    assert not engine.errored and await wait_idle(engine)
    engine.shutdown()


def test_llm_generate_raises_on_a_failed_step_then_serves_again():
    from furiosa_llm import LLM

    llm = LLM("smollm2-135m-instruct", cache_dir=engine_args().cache_dir, devices="cpu", num_kv_blocks=64)
    runner = llm.llm_engine.runner
    real_execute = runner.execute

    def fail_once(batch):
        runner.execute = real_execute
        raise RuntimeError("device fell over")

    runner.execute = fail_once
    with pytest.raises(RequestFailedError, match="device fell over"):
        llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.num_free_blocks == llm.llm_engine.num_total_blocks
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "length"
    llm.llm_engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(["Hello"], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)


async def test_shutdown_aborts_live_requests_and_frees_blocks():
    engine = AsyncLLMEngine.from_engine_args(engine_args(num_kv_blocks=64))
    params = SamplingParams(max_tokens=500, ignore_eos=True, **GREEDY)
    seen = []

    async def consume(i):
        async for o in engine.generate("Write a long essay", params, f"sd{i}"):
            seen.append(o)

    tasks = [asyncio.create_task(consume(i)) for i in range(2)]
    while len(seen) < 2:
        await asyncio.sleep(0.01)
    engine.shutdown()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert {o.outputs[0].finish_reason for o in seen if o.finished} == {"abort"}
    assert engine.native_engine.num_free_blocks == engine.native_engine.num_total_blocks


def test_llm_generate_and_chat():
    from furiosa_llm import LLM

    llm = LLM("smollm2-135m-instruct", cache_dir=engine_args().cache_dir, devices="cpu", num_kv_blocks=256)
    outs = llm.generate(["Hello, my name is", "The sky is"], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=True)
    assert [o.request_id for o in outs] == ["llm-0", "llm-1"] and all(o.outputs[0].text for o in outs)
    chat = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(max_tokens=32, **GREEDY), use_tqdm=False)
    assert chat[0].finished and chat[0].outputs[0].text.strip()
    with pytest.raises(ValueError, match="generative"):
        llm.encode("hi")
    eng = AsyncLLMEngine.from_llm(llm)
    assert eng.model_path == "smollm2-135m-instruct" and eng.max_model_len == llm.llm_engine.max_model_len
    llm.llm_engine.shutdown()
