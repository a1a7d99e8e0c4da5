"""Greedy parity with Hugging Face generate, with and without preemption."""

import asyncio

from furiosa_llm import AsyncLLMEngine, SamplingParams

from conftest import engine_args

PROMPTS = [
    "Hi",
    "What is LLM?",
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Write a poem about the sea and the sky, with rhymes.",
    "Explain the theory of relativity in simple terms for a child who is ten years old and likes trains.",
    "Translate to French: I love cheese and wine very much. " * 4,
]
N = 32


async def run_all(engine, prefix):
    async def one(i, p):
        final = None
        params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
        async for out in engine.generate(p, params, f"{prefix}-{i}"):
            final = out
        return final.outputs[0].token_ids

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))


async def test_greedy_parity_with_hf(async_engine, hf_reference):
    expected = [hf_reference(p, N) for p in PROMPTS]
    got = await run_all(async_engine, "parity")
    assert [len(g) for g in got] == [N] * len(PROMPTS)
    assert got == expected
    assert async_engine.native_engine.num_free_blocks == async_engine.native_engine.num_total_blocks


async def test_greedy_parity_under_preemption(hf_reference):
    engine = AsyncLLMEngine.from_engine_args(engine_args(num_kv_blocks=12, seed=0))
    try:
        expected = [hf_reference(p, N) for p in PROMPTS]
        got = await run_all(engine, "preempt")
        assert engine.native_engine.core.scheduler.stats.num_preemptions > 0
        assert got == expected
        assert engine.native_engine.num_free_blocks == engine.native_engine.num_total_blocks
    finally:
        engine.shutdown()
