"""Many concurrent generate() streams with random cancellations and aborts all end; no block leaks."""

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from furiosa_llm import SamplingParams

ACTIONS = st.lists(
    st.tuples(st.sampled_from(["finish", "cancel", "abort", "break"]), st.integers(1, 12), st.integers(0, 3)),
    min_size=2, max_size=10,
)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(actions=ACTIONS)
def test_concurrent_streams_with_cancellations(async_engine, actions):
    asyncio.run(_scenario(async_engine, actions))


async def _scenario(engine, actions):
    tag = id(actions)
    results: dict[int, object] = {}

    async def stream(i, max_tokens):
        last = None
        async for out in engine.generate(f"Item {i}:", SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), f"p{tag}-{i}"):
            last = out
            if actions[i][0] == "break":
                break
        results[i] = last

    tasks = [asyncio.create_task(stream(i, n)) for i, (_, n, _) in enumerate(actions)]
    await asyncio.sleep(0)
    for i, (kind, _, delay) in enumerate(actions):
        await asyncio.sleep(delay * 0.05)
        if kind == "cancel":
            tasks[i].cancel()
        elif kind == "abort":
            await engine.abort(f"p{tag}-{i}")
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    for i, ((kind, n, _), res) in enumerate(zip(actions, done)):
        if kind == "finish":
            assert not isinstance(res, BaseException), res
            assert results[i].finished and len(results[i].outputs[0].token_ids) == n
        elif kind == "abort" and i in results and results[i] is not None and results[i].finished:
            assert results[i].outputs[0].finish_reason in ("abort", "length")
    for _ in range(100):
        if not engine.native_engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.02)
    n = engine.native_engine
    assert not n.has_unfinished_requests() and n.num_free_blocks == n.num_total_blocks
    assert not engine.request_ids
