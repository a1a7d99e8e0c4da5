"""vLLM-exact output semantics on the embedded model: min_tokens, stopping, text vs token ids,
prompt logprobs with the prefix cache, timing on the first output, and stream integrity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from furiosa_llm import LLMEngine, RequestOutputKind, SamplingParams

from conftest import engine_args

GREEDY = dict(temperature=0.0)
CHAT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def engine():
    eng = LLMEngine(engine_args(num_kv_blocks=512, seed=0))
    yield eng
    eng.shutdown()


_ids = iter(range(10**9))


def run(engine, prompt, **params) -> "RequestOutput":  # noqa: F821
    rid = f"s{next(_ids)}"
    engine.add_request(rid, prompt, SamplingParams(**params))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    assert final is not None
    return final


def chat_ids(engine) -> dict:
    ids = engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return {"prompt_token_ids": list(ids)}


def decode(engine, ids, skip_special_tokens=True) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_min_tokens_masks_eos_and_stop_ids(engine):
    out = run(engine, chat_ids(engine), max_tokens=20, min_tokens=16, **GREEDY).outputs[0]
    assert len(out.token_ids) >= 16
    assert not set(out.token_ids[:16]) & engine.eos_token_ids  # no EOS before min_tokens
    full = decode(engine, out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids)
    assert out.text == full
    # stop token ids are masked too: the first greedy token, made a stop id, cannot end the request early
    first = run(engine, chat_ids(engine), max_tokens=1, **GREEDY).outputs[0].token_ids[0]
    out = run(engine, chat_ids(engine), max_tokens=6, min_tokens=4, stop_token_ids=[first], **GREEDY).outputs[0]
    assert first not in out.token_ids[:4] and len(out.token_ids) >= 4


def test_stop_string_not_searched_before_min_tokens(engine):
    free = run(engine, chat_ids(engine), max_tokens=24, ignore_eos=True, **GREEDY).outputs[0]
    text = free.text
    # a stop string that occurs early in the free text: with min_tokens past it, the text keeps it
    stop = text[: max(3, len(text) // 6)].split()[-1] if text.split() else text[:2]
    out = run(engine, chat_ids(engine), max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=20, **GREEDY).outputs[0]
    n = len(out.token_ids)
    full = decode(engine, out.token_ids)
    if out.finish_reason == "stop":
        assert out.stop_reason == stop and full.startswith(out.text) and full[len(out.text):].startswith(stop)
        assert n > 20 or decode(engine, out.token_ids[:20]).count(stop) < full.count(stop)
    else:
        assert out.text == full and n == 24


def test_stop_token_text_excluded_unless_asked(engine):
    free = run(engine, chat_ids(engine), max_tokens=12, ignore_eos=True, **GREEDY).outputs[0]
    stop_id = free.token_ids[3]
    out = run(engine, chat_ids(engine), max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id], **GREEDY).outputs[0]
    k = out.token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.stop_reason == stop_id and out.token_ids[-1] == stop_id
    assert out.text == decode(engine, out.token_ids[:k])
    kept = run(engine, chat_ids(engine), max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id],
               include_stop_str_in_output=True, **GREEDY).outputs[0]
    assert kept.text == decode(engine, kept.token_ids)


def test_eos_text_never_leaks(engine):
    out = run(engine, chat_ids(engine), max_tokens=64, skip_special_tokens=False, **GREEDY).outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_token_ids
    eos_text = decode(engine, [out.token_ids[-1]], skip_special_tokens=False)
    assert eos_text and eos_text not in out.text


def test_stop_string_completed_by_the_last_allowed_token(engine):
    free = run(engine, chat_ids(engine), max_tokens=8, ignore_eos=True, **GREEDY).outputs[0]
    text = free.text
    k = 1
    while text.find(text[-k:]) != len(text) - k or not text[-k:].strip():
        k += 1
    stop = text[-k:]
    out = run(engine, chat_ids(engine), max_tokens=8, ignore_eos=True, stop=[stop], **GREEDY).outputs[0]
    assert len(out.token_ids) == 8
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == text[: len(text) - k]


def test_prompt_logprobs_one_entry_per_token_with_prefix_cache(engine):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # several full KV blocks
    n = len(engine.tokenizer.encode(prompt))
    for _ in range(2):  # the second time the prefix is cached
        out = run(engine, prompt, max_tokens=1, prompt_logprobs=1, **GREEDY)
        assert len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
        assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, n))


def test_cached_prompt_finishing_on_first_token_reports_timing(engine):
    prompt = "Once upon a time in a land far away, there lived a dragon who " * 3
    run(engine, prompt, max_tokens=1, **GREEDY)
    out = run(engine, prompt, max_tokens=1, **GREEDY)
    assert out.num_cached_tokens > 0
    m = out.metrics
    assert m.first_scheduled_time is not None and m.arrival_time <= m.first_scheduled_time <= m.first_token_time


PROMPTS = ["Hello, my name is", "Écris un poème sur la mer 🌊", "列出三种水果：", "Count: 1, 2, 3,",
           "The capital of France is"]
WORDS = [" the", ",", ".", " a", "e", "\n", " is", "🌊", "水", " and"]


@settings(max_examples=12, deadline=None)
@given(prompt=st.sampled_from(PROMPTS), stops=st.lists(st.sampled_from(WORDS), max_size=2),
       min_tokens=st.integers(0, 6), max_tokens=st.integers(1, 14), include=st.booleans(),
       ignore_eos=st.booleans(), seed=st.integers(0, 3), greedy=st.booleans())
def test_text_matches_tokens_and_delta_matches_cumulative(engine, prompt, stops, min_tokens, max_tokens, include,
                                                          ignore_eos, seed, greedy):
    min_tokens = min(min_tokens, max_tokens)
    base = dict(max_tokens=max_tokens, min_tokens=min_tokens, stop=stops, include_stop_str_in_output=include,
                ignore_eos=ignore_eos, seed=seed, temperature=0.0 if greedy else 0.8)
    outs: dict[str, list] = {"cum": [], "delta": []}
    engine.add_request("p-cum", prompt, SamplingParams(**base))
    engine.add_request("p-delta", prompt, SamplingParams(**base, output_kind=RequestOutputKind.DELTA))
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id.removeprefix("p-")].append(o)
    final = outs["cum"][-1].outputs[0]
    delta_text = "".join(o.outputs[0].text for o in outs["delta"])
    delta_ids = [t for o in outs["delta"] for t in o.outputs[0].token_ids]
    assert delta_ids == final.token_ids
    assert delta_text == final.text
    # the text is the decoded token ids, cut only at the stop string that ended the request
    ids = final.token_ids
    if final.finish_reason == "stop" and not isinstance(final.stop_reason, str) and not include:
        ids = ids[:-1]  # the stop token's text is not part of the output
    full = decode(engine, ids)
    if isinstance(final.stop_reason, str):
        assert final.finish_reason == "stop" and final.stop_reason in stops
        cut = final.text[: len(final.text) - len(final.stop_reason)] if include else final.text
        assert full.startswith(cut) and full[len(cut):].startswith(final.stop_reason)
        if include:
            assert final.text.endswith(final.stop_reason)
    else:
        assert final.text == full
    if len(final.token_ids) < min_tokens:
        assert final.finish_reason == "length"  # only the context can end a request before min_tokens


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 20)), min_size=1, max_size=12),
       skip=st.booleans())
def test_the_backend_decode_equals_the_tokenizers_decode(engine, ids, skip):
    """The detokenizer's shortcut to the Rust decoder gives what ``tokenizer.decode`` gives, special tokens
    (ids below 20 here) and split UTF-8 sequences included."""
    from furiosa_llm.api.detokenizer import IncrementalDetokenizer, _backend_decode

    tok = engine.tokenizer
    fast = _backend_decode(tok, skip)
    assert fast is not None  # the embedded model's tokenizer takes the shortcut
    assert fast(ids) == tok.decode(ids, skip_special_tokens=skip)
    a = IncrementalDetokenizer(tok, [1, 2, 3], skip_special_tokens=skip, stop=["e"])
    b = IncrementalDetokenizer(tok, [1, 2, 3], skip_special_tokens=skip, stop=["e"])
    b._decode = b._hf_decode
    assert [a.add(t) for t in ids] == [b.add(t) for t in ids]
    assert a.visible_text(True) == b.visible_text(True)
