"""A decoder model served as an embedder (vLLM's ``--task embed`` / ``--convert embed``): the embedded chat
model's last hidden states pooled (last token by default, or mean), against plain ``transformers``."""

from __future__ import annotations

import pytest

from furiosa_llm import LLM, SamplingParams
from furiosa_llm.api.engine_args import EngineArgs

from conftest import CACHE_DIR, MODEL

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "What is the weather like today?",
    "Machine learning models need data, compute and careful evaluation before they are deployed.",
    "ok",
]


@pytest.fixture(scope="module")
def llm():
    with LLM(MODEL, cache_dir=CACHE_DIR, devices="cpu", convert="embed", max_num_batched_tokens=32) as m:
        yield m


@pytest.fixture(scope="module")
def reference(llm):
    """Per sentence, alone (no padding): the final-norm hidden states of Hugging Face's ``AutoModel``."""
    import torch
    from transformers import AutoModel

    from furiosa_llm.model.loader import _gguf_cache_folder, resolve_model

    model = AutoModel.from_pretrained(_gguf_cache_folder(resolve_model(MODEL), CACHE_DIR), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for s in SENTENCES:
            ids = torch.tensor([llm.tokenizer(s)["input_ids"]])
            out.append(model(input_ids=ids).last_hidden_state[0])
    return out


def _cos(a, b) -> float:
    import torch

    a, b = torch.tensor(a, dtype=torch.float32), b.float()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_last_token_parity_batched_and_alone(llm, reference):
    assert llm.task_type == "embed" and llm.engine.pooling_config.pooling_type == "LAST"
    outs = llm.embed(SENTENCES)  # 32-token budget: several steps, padded batches
    assert sum(len(o.prompt_token_ids) for o in outs) > 32
    for o, h in zip(outs, reference):
        assert len(o.outputs.embedding) == 576
        assert _cos(o.outputs.embedding, h[-1]) >= 0.9999
        assert abs(sum(x * x for x in o.outputs.embedding) - 1.0) < 1e-4
    (one,) = llm.embed(SENTENCES[2])
    assert _cos(one.outputs.embedding, reference[2][-1]) >= 0.9999
    st = llm.engine.stats()
    assert st.num_kv_blocks_used == 0 and st.num_running == 0


def test_generate_on_converted_model_is_a_value_error(llm):
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate("hello", SamplingParams(max_tokens=2))


def test_mean_pooling_parity(reference):
    with LLM(MODEL, cache_dir=CACHE_DIR, devices="cpu", task="embed", pooling_type="MEAN") as m:
        assert m.engine.pooling_config.pooling_type == "MEAN"
        for o, h in zip(m.embed(SENTENCES), reference):
            assert _cos(o.outputs.embedding, h.mean(0)) >= 0.9999


def test_task_flags_validation():
    with pytest.raises(ValueError, match="task='translate'"):
        EngineArgs(model=MODEL, task="translate")
    with pytest.raises(ValueError, match="convert='classify'"):
        EngineArgs(model=MODEL, convert="classify")
    with pytest.raises(ValueError, match="convert='embed' with task='generate'"):
        EngineArgs(model=MODEL, convert="embed", task="generate")
    with pytest.raises(ValueError, match="pooling_type='MAX'"):
        EngineArgs(model=MODEL, pooling_type="MAX")
    with pytest.raises(ValueError, match="pooling_type='MEAN'.*generative"):
        LLM(MODEL, cache_dir=CACHE_DIR, devices="cpu", pooling_type="MEAN")
    with pytest.raises(ValueError, match="encoder.*cannot generate"):
        LLM("all-minilm-l6-v2", devices="cpu", task="generate")
    import argparse

    ns = EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--model", MODEL, "--convert", "embed", "--pooling-type", "mean"])
    args = EngineArgs.from_cli_args(ns)
    assert args.requested_task == "embed" and args.pooling_type == "MEAN"


async def test_server_on_converted_model(llm):
    import httpx

    from furiosa_llm.api.async_llm_engine import AsyncLLMEngine
    from furiosa_llm.entrypoints.openai.api_server import create_app

    app = create_app(AsyncLLMEngine.from_llm(llm), served_model_name="smol-embed", log_interval_s=0)
    (expected,) = llm.embed(SENTENCES[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert (await http.get("/v1/models")).json()["data"][0]["task"] == "embed"
        r = await http.post("/v1/embeddings", json={"input": SENTENCES[1]})
        assert r.status_code == 200, r.text
        got = r.json()["data"][0]["embedding"]
        assert max(abs(a - b) for a, b in zip(got, expected.outputs.embedding)) < 1e-5
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
