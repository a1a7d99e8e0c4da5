"""Data-parallel replicas of the real engine as Ray actors behind one front, through the OpenAI server.

DP=2 on the CPU (one torch thread per replica) with the embedded model: 64 concurrent requests
from the unmodified ``openai`` client, each replica serves some; killing one replica's actor
mid-run fails only its in-flight requests, the other keeps serving and the killed one comes back.
One local Ray (2 CPUs) for the module. Slow (Ray start + two model loads): ``-m slow``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")

from conftest import CACHE_DIR, MODEL  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dp_server():
    import uvicorn

    from furiosa_llm import AsyncEngineArgs, AsyncLLMEngine
    from furiosa_llm.entrypoints.openai.api_server import create_app

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=MODEL, cache_dir=CACHE_DIR, devices="cpu", data_parallel_size=2, num_kv_blocks=512, max_model_len=128,
        seed=0))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, served_model_name=MODEL), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield url, engine
    server.should_exit = True
    thread.join(30)
    engine.shutdown()
    if started:
        ray.shutdown()


async def _complete(client, i: int, max_tokens: int):
    import openai

    try:
        r = await client.completions.create(model=MODEL, prompt=f"Request {i}: tell me about the number {i}.",
                                            max_tokens=max_tokens, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.usage.completion_tokens
    except openai.APIError as e:
        return e


def _client(url: str):
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_dp2_serves_64_concurrent_requests_on_both_replicas(dp_server):
    url, engine = dp_server
    front = engine.native_engine
    before = [r["routed"] for r in front.replica_stats()]

    async def run():
        client = _client(url)
        return await asyncio.gather(*(_complete(client, i, 8) for i in range(64)))

    t0 = time.perf_counter()
    got = asyncio.run(run())
    wall = time.perf_counter() - t0
    assert all(n == 8 for n in got), [g for g in got if g != 8][:3]
    routed = [r["routed"] - b for r, b in zip(front.replica_stats(), before)]
    print(f"64 requests in {wall:.1f} s, routed {routed}")
    assert sum(routed) == 64 and min(routed) > 0
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for i in (0, 1):  # per-replica series carry a replica label
        assert re.search(rf'^furiosa_llm_replica_requests_routed_total{{[^}}]*replica="{i}"[^}}]*}} [1-9]', text, re.M)
    assert "furiosa_llm_replica_generation_tokens_total" in text

    # a client that disconnects mid-stream aborts its request on its replica, across the actor boundary
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i >= 4:
                break
    deadline = time.monotonic() + 30
    while True:
        st = front.replica_stats()
        if sum(x["live"] for x in st) == 0 and front.stats().num_unfinished == 0:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    assert sum(x["stats"].num_generated_tokens for x in st) < 64 * 8 + 100  # it stopped well before 100 tokens


def test_killing_a_replica_fails_only_its_requests_and_it_comes_back(dp_server):
    url, engine = dp_server
    front = engine.native_engine
    victim = front.replicas[1]

    async def run():
        client = _client(url)
        tasks = [asyncio.create_task(_complete(client, i, 32)) for i in range(12)]
        deadline = time.monotonic() + 60
        while front.replica_stats()[1]["live"] == 0 or front.replica_stats()[0]["live"] == 0:
            assert time.monotonic() < deadline, "requests never reached both replicas"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # mid-run: both replicas are generating
        live = front.replica_stats()[1]["live"]
        ray.kill(victim.actor, no_restart=False)  # the actor dies; Ray restarts it
        return live, await asyncio.gather(*tasks)

    live_at_kill, got = asyncio.run(run())
    failed = [g for g in got if not isinstance(g, int)]
    ok = [g for g in got if isinstance(g, int)]
    print(f"killed replica 1 with {live_at_kill} live requests: {len(failed)} failed, {len(ok)} completed")
    assert failed and len(failed) <= live_at_kill  # only the victim's in-flight requests
    assert all(n == 32 for n in ok) and len(ok) >= 12 - live_at_kill
    assert all(getattr(e, "status_code", 500) >= 500 for e in failed)
    stats = front.replica_stats()
    assert stats[1]["restarts"] == 1 and stats[1]["failed"] == len(failed) and stats[0]["failed"] == 0
    deadline = time.monotonic() + 180
    while not front.replica_stats()[1]["available"]:  # the restarted actor reloads its model
        front._poll_restarts(0.5)
        assert time.monotonic() < deadline, "replica 1 did not come back"
    before = front.replica_stats()[1]["routed"]

    async def again():
        client = _client(url)
        return await asyncio.gather(*(_complete(client, 100 + i, 8) for i in range(8)))

    assert all(n == 8 for n in asyncio.run(again()))
    assert front.replica_stats()[1]["routed"] > before  # serving again
