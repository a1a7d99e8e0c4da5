"""The simulator costs embedding (pooling) requests as prefill only; ``furiosa-llm simulate --embed-fraction``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from furiosa_llm.hal.cost_model import BatchShape, load_model_shape, rngd_cost_model
from furiosa_llm.hal.batch import Batch, SamplingSettings, SequenceChunk
from furiosa_llm.sim import SimConfig, Workload, simulate

SMALL = dict(num_requests=200, input_len="lognormal:512:0.5", output_len="lognormal:64:0.5")


def test_embed_fraction_marks_requests_and_keeps_the_stream():
    base = Workload(**SMALL).generate()
    mixed = Workload(**SMALL, embed_fraction=0.3).generate()
    assert base.pooling is None
    assert np.array_equal(base.arrived_at, mixed.arrived_at) and np.array_equal(base.input_lens, mixed.input_lens)
    assert 0.2 < mixed.pooling.mean() < 0.4
    with pytest.raises(ValueError, match="embed_fraction=1.5"):
        Workload(embed_fraction=1.5)


def test_a_pooling_chunk_costs_no_lm_head():
    model, cost = load_model_shape("llama-3.1-8b"), rngd_cost_model(8)

    def shape(pool: bool) -> BatchShape:
        chunk = SequenceChunk(request_id="a", token_ids=[5] * 512, start_pos=0, block_table=[], sample=not pool,
                              sampling=SamplingSettings(), pool=pool)
        return BatchShape.of(Batch(step_id=0, sequences=[chunk]))

    assert shape(True).num_sampled == 0 and shape(False).num_sampled == 1
    assert cost.device_time(model, shape(True)) < cost.device_time(model, shape(False))


def test_embedding_workload_is_prefill_only():
    cfg = SimConfig(model="llama-3.1-8b", devices="npu:0")
    gen = simulate(cfg, Workload(**SMALL, request_rate=20.0)).report["metrics"]
    emb = simulate(cfg, Workload(**SMALL, request_rate=20.0, embed_fraction=1.0)).report["metrics"]
    mix = simulate(cfg, Workload(**SMALL, request_rate=20.0, embed_fraction=0.5)).report["metrics"]
    # a pooling prompt runs whole in one step: one longer than the token budget (2048) is refused on arrival
    assert emb["completed"] + emb["rejected"] == 200 and emb["rejected"] <= 2
    assert emb["total_output_tokens"] == 0 and emb["aborted"] == 0
    assert mix["completed"] + mix["rejected"] == 200 and 0 < mix["total_output_tokens"] < gen["total_output_tokens"]
    assert emb["mean_e2el_ms"] < mix["mean_e2el_ms"] < gen["mean_e2el_ms"]  # no decode steps: done after the prefill


def test_cli_simulate_embedding_mix(tmp_path):
    from furiosa_llm.entrypoints.cli import main

    out = tmp_path / "r.json"
    rc = main(["simulate", "--model", "llama-3.1-8b", "--devices", "npu:0", "--num-requests", "100",
               "--request-rate", "5", "--embed-fraction", "0.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["completed"] + report["metrics"]["rejected"] == 100 and report["workload"]["embed_fraction"] == 0.5
