"""Pooling (issue 14): the embedded embedder through the same engine core, the API and the server."""

from __future__ import annotations

import asyncio
import base64
import struct

import pytest

from furiosa_llm import LLM
from furiosa_llm.api.async_llm_engine import AsyncLLMEngine
from furiosa_llm.api.outputs import PoolingParams

MODEL = "all-minilm-l6-v2"

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Embeddings map text to vectors.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "What is the weather like today?",
    "Machine learning models need data, compute and careful evaluation before they are deployed to production.",
    "ok",
    "The mitochondria is the powerhouse of the cell.",
    "I love pizza with extra cheese and mushrooms, but not pineapple.",
    "Rust and Python are both popular programming languages.",
    "She sells sea shells by the sea shore.",
    " ".join(["A long sentence about transformers and attention."] * 12),
    "1 2 3 4 5",
    "Where is the nearest train station?",
    "Sentence embeddings are useful for semantic search, clustering and retrieval augmented generation.",
    "Yes",
    "The meeting was moved to Thursday afternoon because the projector in room four is broken again.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "¿Dónde está la biblioteca?",
    "Emojis 🙂 and accents (café, naïve) are tokenized too.",
    "The stock market fell sharply after the central bank raised interest rates by half a percentage point.",
    "Tea or coffee?",
    " ".join(["Every step of the engine packs whole prompts into one row of tokens."] * 6),
    "GPUs and NPUs accelerate matrix multiplications.",
    "The old lighthouse keeper watched the storm roll in over the grey, restless sea.",
    "x = 42",
    "Birds migrate south for the winter, navigating by the stars and the Earth's magnetic field.",
    "Please summarise the attached report in three bullet points.",
    "A",
    "Quantum computers use qubits, which can be in superpositions of zero and one.",
    "He said nothing, turned around, and walked out into the rain without his umbrella.",
]
assert len(SENTENCES) == 32


@pytest.fixture(scope="module")
def llm():
    with LLM(MODEL, devices="cpu", max_num_batched_tokens=256) as m:
        yield m


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoModel, AutoTokenizer

    from furiosa_llm.model.loader import resolve_model

    folder = resolve_model(MODEL).path
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _cos(a, b) -> float:
    import torch

    a, b = torch.tensor(a, dtype=torch.float32), b.float()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _no_leak(llm) -> None:
    st = llm.engine.stats()
    assert st.num_kv_blocks_used == 0 and st.num_running == 0 and st.num_waiting == 0
    assert not llm.engine.has_unfinished_requests()


def test_task_and_pooling_config(llm):
    assert llm.task_type == "embed"
    assert llm.engine.pooling_config.pooling_type == "MEAN" and llm.engine.pooling_config.normalize


def test_parity_all_at_once(llm, reference):
    outs = llm.embed(SENTENCES)
    assert len(outs) == len(SENTENCES)
    for o, ref in zip(outs, reference):
        assert len(o.outputs.embedding) == 384
        assert _cos(o.outputs.embedding, ref) >= 0.9999
        assert abs(sum(x * x for x in o.outputs.embedding) - 1.0) < 1e-4
    # the token budget (256) is smaller than the sum of the prompts: they ran in several steps
    assert sum(len(o.prompt_token_ids) for o in outs) > 2 * 256
    assert len({len(o.prompt_token_ids) for o in outs}) >= 16  # varied lengths
    _no_leak(llm)


def test_parity_one_at_a_time(llm, reference):
    for s, ref in zip(SENTENCES, reference):
        (o,) = llm.embed(s)
        assert _cos(o.outputs.embedding, ref) >= 0.9999
    _no_leak(llm)


def test_dimensions_and_normalize(llm, reference):
    (full,) = llm.encode(SENTENCES[2], PoolingParams(normalize=False))
    vec = full.outputs.data
    assert abs(sum(x * x for x in vec) - 1.0) > 1e-3  # raw mean pooling is not unit length
    assert _cos(vec, reference[2]) >= 0.9999
    (short,) = llm.embed(SENTENCES[2], PoolingParams(dimensions=32))
    assert len(short.outputs.embedding) == 32
    assert abs(sum(x * x for x in short.outputs.embedding) - 1.0) < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens=-2"),
    (dict(dimensions=0), "dimensions=0"),
    (dict(normalize="yes"), "normalize='yes'"),
    (dict(task="translate"), "task='translate'"),
])
def test_bad_pooling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoolingParams(**kwargs)


def test_errors_and_engine_still_serves(llm, reference):
    with pytest.raises(ValueError, match="dimensions=385.*384"):
        llm.embed("x", PoolingParams(dimensions=385))
    with pytest.raises(ValueError, match="classify"):
        llm.encode("x", PoolingParams(task="classify"))
    long = "word " * 600
    with pytest.raises(ValueError, match=r"602 prompt tokens exceed max_model_len=512"):
        llm.embed(long)
    with pytest.raises(ValueError, match=r"300 tokens.*max_num_batched_tokens=256"):
        llm.embed({"prompt_token_ids": [1000] * 300})
    # truncation keeps the last tokens (mean pooling)
    (t,) = llm.embed(long, truncate_prompt_tokens=10)
    assert len(t.prompt_token_ids) == 10 and t.prompt_token_ids[-1] == 102
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate("hello")
    (o,) = llm.embed(SENTENCES[1])
    assert _cos(o.outputs.embedding, reference[1]) >= 0.9999
    _no_leak(llm)


def test_add_request_accepts_pooling_params(llm):
    eng = llm.llm_engine
    eng.add_request("pool-a", "hello there", PoolingParams())
    with pytest.raises(ValueError, match="already has this id"):
        eng.add_request("pool-a", "again", PoolingParams())
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert [o.request_id for o in outs] == ["pool-a"] and len(outs[0].outputs.data) == 384
    _no_leak(llm)


def test_async_encode_abort_and_generate_error(llm, reference):
    engine = AsyncLLMEngine.from_llm(llm)

    async def main():
        outs = [o async for o in engine.encode(SENTENCES[3], PoolingParams(), "a-1")]
        assert len(outs) == 1 and outs[0].finished and _cos(outs[0].outputs.data, reference[3]) >= 0.9999
        with pytest.raises(ValueError, match="embedding model"):
            async for _ in engine.generate("hi", None, "g-1"):
                pass
        # abort before the step: the stream ends without an output, blocks freed
        llm.engine.add_pooling_request("a-2", SENTENCES[4])
        gen = engine.encode(SENTENCES[5], None, "a-3")
        await engine.abort("a-2")
        got = [o async for o in gen]
        assert len(got) == 1 and got[0].request_id == "a-3"
        # a consumer that stops iterating before the result: its request is freed
        gen = engine.encode(SENTENCES[6], None, "a-4")
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, StopAsyncIteration)):
            await task
        await gen.aclose()
        for _ in range(100):
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert not engine.request_ids
    _no_leak(llm)


def test_encode_on_generative_model_is_a_value_error():
    from furiosa_llm.api.native_engine import NativeEngine

    # the check needs no model: a generative NativeEngine's pooling entry refuses by its task
    eng = NativeEngine.__new__(NativeEngine)
    eng._closed, eng.task = False, "generate"
    eng.args = type("A", (), {"model": "smollm2-135m-instruct"})()
    with pytest.raises(ValueError, match="generative model"):
        eng.add_pooling_request("x", "hello")


async def test_openai_client_embeddings_equal_llm_embed(llm):
    import httpx
    import openai

    from furiosa_llm.entrypoints.openai.api_server import create_app

    engine = AsyncLLMEngine.from_llm(llm)
    app = create_app(engine, served_model_name=MODEL, log_interval_s=0)
    expected = [o.outputs.embedding for o in llm.embed(SENTENCES[:4])]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http)
        # the client's default asks for base64 and decodes it itself; explicit base64 comes back as the string
        for fmt in ("float", "base64", None):
            kw = {} if fmt is None else {"encoding_format": fmt}
            r = await client.embeddings.create(model=MODEL, input=SENTENCES[:4], **kw)
            assert [d.index for d in r.data] == [0, 1, 2, 3]
            assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(s)) for s in SENTENCES[:4])
            for d, e in zip(r.data, expected):
                vec = d.embedding
                if fmt == "base64":
                    vec = list(struct.unpack("<384f", base64.b64decode(vec)))
                assert len(vec) == 384
                assert max(abs(a - b) for a, b in zip(vec, e)) < 1e-5
        ids = llm.tokenizer.encode(SENTENCES[0])
        r = await client.embeddings.create(model=MODEL, input=[ids], dimensions=16, encoding_format="float")
        assert len(r.data[0].embedding) == 16
        r = await http.post("/v1/embeddings", json={"input": "word " * 600})
        assert r.status_code == 400 and "max_model_len=512" in r.json()["error"]["message"], r.text
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"], r.text
        r = await http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 400
    _no_leak(llm)


def test_score_is_cosine_of_embeddings(llm):
    q, docs = "Where is Paris?", ["Paris is the capital of France.", "I love pizza.", "Berlin is in Germany."]
    embs = [o.outputs.embedding for o in llm.embed([q, *docs])]
    outs = llm.score(q, docs)  # 1:N
    dots = [sum(a * b for a, b in zip(embs[0], e)) for e in embs[1:]]  # unit vectors: cosine = dot product
    assert max(abs(o.outputs.score - d) for o, d in zip(outs, dots)) < 1e-5
    assert outs[0].outputs.score > outs[1].outputs.score  # the relevant document scores higher
    assert outs[0].prompt_token_ids == llm.tokenizer.encode(q) + llm.tokenizer.encode(docs[0])
    pair = llm.score([q, docs[1]], [docs[0], docs[1]])  # N:N
    assert abs(pair[0].outputs.score - outs[0].outputs.score) < 1e-6 and abs(pair[1].outputs.score - 1.0) < 1e-5
    with pytest.raises(ValueError, match="text_1 has 2 items and text_2 3"):
        llm.score([q, q], docs)
    with pytest.raises(ValueError, match="text_2"):
        llm.score(q, [])
    _no_leak(llm)


async def test_server_score_rerank_and_models(llm):
    import httpx

    from furiosa_llm.entrypoints.openai.api_server import create_app

    engine = AsyncLLMEngine.from_llm(llm)
    app = create_app(engine, served_model_name=MODEL, log_interval_s=0)
    q, docs = "Where is Paris?", ["I love pizza.", "Paris is the capital of France.", "Berlin is in Germany."]
    expected = [o.outputs.score for o in llm.score(q, docs)]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        r = await http.get("/v1/models")
        assert r.json()["data"][0]["task"] == "embed"
        r = await http.post("/score", json={"model": MODEL, "text_1": q, "text_2": docs})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "list", r.text
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert max(abs(d["score"] - e) for d, e in zip(body["data"], expected)) < 1e-6
        assert body["usage"]["prompt_tokens"] == sum(len(llm.tokenizer.encode(t)) for t in [q, *docs])
        r = await http.post("/v1/score", json={"text_1": [q, q], "text_2": docs})
        assert r.status_code == 400 and "text_1 has 2 items" in r.json()["error"]["message"]
        r = await http.post("/score", json={"text_1": q, "text_2": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text_2"
        r = await http.post("/rerank", json={"model": MODEL, "query": q, "documents": docs, "top_n": 2})
        body = r.json()
        assert r.status_code == 200, r.text
        best = sorted(range(3), key=lambda i: -expected[i])[:2]
        assert [x["index"] for x in body["results"]] == best and best[0] == 1
        assert body["results"][0]["document"]["text"] == docs[1]
        scores = [x["relevance_score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 2
        assert abs(scores[0] - max(expected)) < 1e-6 and body["usage"]["total_tokens"] > 0
        r = await http.post("/v1/rerank", json={"query": q, "documents": []})
        assert r.status_code == 400 and "documents" in r.json()["error"]["message"]
    _no_leak(llm)


@pytest.mark.parametrize("pooling_type", ["CLS", "LAST", "MEAN"])
def test_packed_forward_equals_padded_forward(llm, pooling_type):
    """The padding-free packed BERT forward pools the same vectors as Hugging Face's padded forward."""
    import torch

    from furiosa_llm.hal import SamplingSettings, SequenceChunk
    from furiosa_llm.model.packed_encoder import group_by_length
    from furiosa_llm.model.pooling_runner import PoolingRunner

    runner = PoolingRunner(llm.engine.runner.model, "cpu", pooling_type)
    assert runner.packed is not None
    seqs = [SequenceChunk(request_id=str(i), token_ids=llm.tokenizer.encode(s), start_pos=0, block_table=[],
                          sample=False, sampling=SamplingSettings(), pool=True) for i, s in enumerate(SENTENCES)]
    with torch.inference_mode():
        packed, padded = runner._pool_packed(seqs), runner._pool_padded(seqs)
    assert torch.nn.functional.cosine_similarity(packed, padded).min() >= 0.99999
    groups = group_by_length([len(s.token_ids) for s in seqs])
    assert sorted(i for g in groups for i in g) == list(range(len(seqs))) and len(groups) > 1
