"""The simulator against the real torch backend: same decisions, and predictions near measurements."""

from __future__ import annotations

import time

import pytest
import simpy

from furiosa_llm.core import EngineConfig, EngineCore, Request, SchedulerConfig
from furiosa_llm.hal import SamplingSettings, ThreadedQueue
from furiosa_llm.hal.cost_model import ModelShape, rngd_cost_model
from furiosa_llm.hal.simulator import SimQueue

from conftest import CACHE_DIR, MODEL


@pytest.fixture(scope="module")
def engine():
    from furiosa_llm import EngineArgs, LLMEngine

    eng = LLMEngine(EngineArgs(model=MODEL, cache_dir=CACHE_DIR, devices="cpu", num_kv_blocks=512, seed=0, dtype="float32"))
    yield eng
    eng.shutdown()


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Explain what a KV cache is in one sentence.",
    "1, 2, 3, 4,",
    "The quick brown fox",
]
# step index -> requests that arrive before that step
WAVES = {0: [0, 1, 2], 2: [3], 5: [4, 5], 9: [6, 7]}


def _drive(core: EngineCore, tok) -> tuple[list, dict[str, list[int]]]:
    """Add each wave before its step and step until done; the same driver for every backend."""
    outputs: dict[str, list[int]] = {}
    step = 0
    pending = dict(WAVES)
    while pending or core.has_unfinished():
        for i in pending.pop(step, []):
            ids = tok(PROMPTS[i]).input_ids
            core.add_request(Request(f"r{i}", ids, max_tokens=16 + 4 * i, arrival_time=core.clock(),
                                     sampling=SamplingSettings(temperature=0.0)))
        for out in core.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
        assert step < 500
    return core.trace, outputs


@pytest.mark.parametrize("limit,slots", [(1, 1), (2, 1), (2, 2), (3, 3)])
def test_same_decisions_on_simulator_and_torch_backend(engine, limit, slots):
    # few blocks and a small token budget: chunked prefill, preemption and waiting all happen; with
    # several batch slots the running requests are split among the batches in flight (a filled pipeline)
    cfg = dict(num_blocks=10, block_size=16, max_num_batched_tokens=24, max_processing_samples=5, spare_blocks_ratio=0.1,
               num_batch_slots=slots)

    config = EngineConfig(SchedulerConfig(**cfg), npu_queue_limit=limit)
    torch_core = EngineCore.from_config(config, ThreadedQueue(engine.runner, limit, clock=time.monotonic), time.monotonic,
                                        eos_token_ids=engine.eos_token_ids, record_trace=True)
    torch_trace, torch_out = _drive(torch_core, engine.tokenizer)
    torch_core.queue.close()

    env = simpy.Environment()
    shape = ModelShape.from_hf_config(engine.model_config)
    queue = SimQueue(env, shape, rngd_cost_model(1, model=shape), engine.runner, limit)  # real tokens from the model
    sim_core = EngineCore.from_config(config, queue, lambda: env.now, eos_token_ids=engine.eos_token_ids,
                                      record_trace=True)
    sim_trace, sim_out = _drive(sim_core, engine.tokenizer)

    assert torch_core.stats().num_preemptions > 0
    assert any(n > 1 and n < 24 for _, step in torch_trace for _, n in step)  # a prefill chunk
    assert sim_trace == torch_trace
    assert sim_out == torch_out
    assert env.now > 0  # simulated time advanced by the cost model


def test_calibrated_simulator_predicts_the_real_engine(engine):
    """Calibrate on one sweep, then predict a different workload; a loose bound noise cannot break."""
    from furiosa_llm.sim import SimConfig, Workload, simulate
    from furiosa_llm.sim.calibrate import Sweep, calibrate
    from furiosa_llm.sim.real import run_workload

    cost, shape = calibrate(engine, Sweep(batch_sizes=(1, 4, 16), prompt_lens=(32, 256), decode_tokens=8,
                                          long_prompt_lens=(512, 1024)))
    assert cost.notes["median_rel_error"] < 0.3
    # the sweep has steps where a prefill joins running decodes, and long prompts that set the attention rate
    assert cost.notes["by_kind"]["mixed"]["samples"] >= 6 and cost.s_per_attn_flop is not None
    wl = Workload(num_requests=16, request_rate=2.0, input_len="lognormal:160:0.6", output_len="uniform:8:40", seed=5)
    real = run_workload(engine, wl).summary()
    sim = simulate(SimConfig(model=shape, profile=cost, devices="cpu", num_kv_blocks=engine.num_total_blocks,
                             max_num_batched_tokens=engine.args.max_num_batched_tokens), wl).report["metrics"]
    assert real["completed"] == sim["completed"] == 16
    assert real["total_output_tokens"] == sim["total_output_tokens"]
    for key, bound in (("output_throughput", 0.35), ("median_tpot_ms", 0.5), ("median_ttft_ms", 1.0)):
        err = abs(sim[key] - real[key]) / real[key]
        assert err < bound, f"{key}: simulated {sim[key]:.1f} vs measured {real[key]:.1f} ({err:.0%})"


def test_cli_functional_run_takes_tokens_from_the_model(capsys):
    import json

    from furiosa_llm.entrypoints.cli import main

    args = ["simulate", "--model", MODEL, "--cache-dir", CACHE_DIR, "--devices", "npu:0", "--token-source", "model",
            "--num-requests", "6", "--input-len", "fixed:24", "--output-len", "fixed:5", "--no-progress"]
    assert main(args) == 2 and "pass --num-kv-blocks" in capsys.readouterr().err
    assert main(args + ["--num-kv-blocks", "128"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 6 and report["total_output_tokens"] == 30


def test_real_engine_and_simulator_derive_the_same_core_config():
    """One mapping from arguments to the core: the torch engine and the simulator get the same EngineConfig."""
    import dataclasses

    from furiosa_llm import EngineArgs, LLMEngine
    from furiosa_llm.sim import SimConfig

    args = EngineArgs(model=MODEL, cache_dir=CACHE_DIR, devices="cpu", num_kv_blocks=300, max_model_len=100_000,
                      max_processing_samples=7, spare_blocks_ratio=0.1, max_num_batched_tokens=512, npu_queue_limit=2,
                      enable_prefix_caching=False, enable_jit_compilation=True, jit_threshold=3, block_size=8)
    real = LLMEngine(args)
    try:
        shape = ModelShape.from_hf_config(real.model_config, name=MODEL)
        sim = SimConfig.from_engine_args(dataclasses.replace(args, devices="npu:0"), model=shape).plan()
        assert sim.engine_config == real.engine_config
        # max_model_len is capped by the model's context and the KV cache on both backends alike
        assert real.max_model_len == sim.max_model_len == min(real.model_config.max_position_embeddings, 300 * 8)
    finally:
        real.shutdown()
