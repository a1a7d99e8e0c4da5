"""Structured outputs with the embedded model: JSON schemas drawn by hypothesis, regex, choice, grammars,
the params' validation, and how constrained requests live with chunked prefill, preemption, stop strings,
min_tokens, logprobs and unconstrained batch mates.

The default run draws a few schemas (``SCHEMAS_DEFAULT``); ``-m slow`` runs the issue's 50.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import uuid

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from furiosa_llm import SamplingParams, StructuredOutputsParams

SCHEMAS_DEFAULT = 6
SCHEMAS_SLOW = 50
PROMPT = "Give an example JSON value:"

# ---- the params ---------------------------------------------------------------------------------


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one constraint"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="json, regex"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs.json="):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="structured_outputs.backend='outlines'"):
        StructuredOutputsParams(regex="a", backend="outlines")
    p = StructuredOutputsParams(json='{"type": "integer"}', disable_any_whitespace=True)
    assert p.kind == "json" and p.key() == StructuredOutputsParams(json='{"type": "integer"}', disable_any_whitespace=True).key()


def test_from_optional_and_sampling_params():
    assert StructuredOutputsParams.from_optional(json=None, regex=None, backend="xgrammar") is None
    p = StructuredOutputsParams.from_optional(regex="[a-z]+", json=None, disable_any_whitespace=None)
    assert p.regex == "[a-z]+" and p.disable_any_whitespace is False
    with pytest.raises(TypeError, match="bogus"):
        StructuredOutputsParams.from_optional(bogus=1)
    sp = SamplingParams(structured_outputs=p)
    assert sp.clone().structured_outputs == p
    with pytest.raises(ValueError, match="structured_outputs="):
        SamplingParams(structured_outputs={"regex": "a"})
    import furiosa_llm.sampling_params as vllm_path

    assert vllm_path.StructuredOutputsParams is StructuredOutputsParams


# ---- the engine ---------------------------------------------------------------------------------


async def _generate(engine, prompt, params):
    out = None
    async for out in engine.generate(prompt, params, uuid.uuid4().hex):
        pass
    return out


def _run(engine, jobs):
    async def go():
        return await asyncio.gather(*(_generate(engine, p, sp) for p, sp in jobs))
    return asyncio.run(go())


def _so(max_tokens=200, temperature=1.0, **kw):
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**kw))


_NAMES = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=6)
_LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 1000)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.integers(-100, 100), st.integers(1, 100)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.just({"type": "boolean"}),
    st.lists(_NAMES, min_size=1, max_size=4, unique=True).map(lambda xs: {"enum": xs}),
)


def _object(children):
    return st.dictionaries(_NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req}))


def _array(children):
    return st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra},
                     children, st.integers(0, 1), st.integers(1, 2))


SCHEMAS = _object(st.recursive(_LEAVES, lambda c: st.one_of(_object(c), _array(c)), max_leaves=5))


def _check_schemas(engine, schemas):
    """Every constrained output parses and validates; the unconstrained batch mates still run."""
    jobs = [(PROMPT, _so(json=s, disable_any_whitespace=True)) for s in schemas]
    jobs += [("Once upon a time", SamplingParams(temperature=1.0, max_tokens=24))] * 2
    outs = _run(engine, jobs)
    for schema, out in zip(schemas, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
    assert all(o.outputs[0].token_ids for o in outs[len(schemas):])


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(SCHEMAS, min_size=SCHEMAS_DEFAULT, max_size=SCHEMAS_DEFAULT))
def test_random_json_schemas_validate(async_engine, schemas):
    _check_schemas(async_engine, schemas)


@pytest.mark.slow
@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(SCHEMAS, min_size=SCHEMAS_SLOW, max_size=SCHEMAS_SLOW))
def test_fifty_random_json_schemas_validate(async_engine, schemas):
    _check_schemas(async_engine, schemas)


ARITH = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= num | "(" expr ")"\nnum ::= [1-9] [0-9]?'
ARITH_LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUM | "(" expr ")"\nNUM: /[1-9][0-9]?/'


def _arith_ok(text: str) -> bool:
    if not re.fullmatch(r"[0-9+\-()]+", text):
        return False
    try:
        compile(text, "<expr>", "eval")
    except SyntaxError:
        return False
    return True


def test_regex_choice_grammar_json_object_with_unconstrained_mates(async_engine):
    jobs = [("Phone:", _so(regex=r"\d{3}-\d{4}")),
            ("Sentiment of 'great!':", _so(choice=["positive", "negative", "neutral"])),
            ("Sentiment:", _so(temperature=0.0, choice=["yes", "no"])),
            ("Math:", _so(max_tokens=48, grammar=ARITH)),
            ("Math:", _so(max_tokens=48, grammar=ARITH_LARK)),  # Lark: llguidance
            ("JSON:", _so(json_object=True, disable_any_whitespace=True, backend="guidance")),
            ("JSON:", _so(json_object=True)),
            ("Hello", SamplingParams(temperature=1.0, max_tokens=16))]
    outs = [o.outputs[0] for o in _run(async_engine, jobs)]
    assert re.fullmatch(r"\d{3}-\d{4}", outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("positive", "negative", "neutral") and outs[2].text in ("yes", "no")
    for c in outs[3:5]:  # the grammar can go on forever: a complete expression, or a prefix cut by max_tokens
        assert c.finish_reason == "length" or _arith_ok(c.text), c.text
    for c in outs[5:7]:  # any JSON object: a sampled string may run to max_tokens; a complete one parses
        assert c.text.startswith("{") and (c.finish_reason == "length" or isinstance(json.loads(c.text), dict)), c.text
    assert outs[7].token_ids


def test_bad_constraint_is_a_value_error_for_that_request_only(async_engine):
    for bad in (dict(json={"type": "objectx"}), dict(regex="a(b"), dict(grammar="root ::= ("),
                dict(json={"type": "string"}, whitespace_pattern=" ", backend="xgrammar")):
        with pytest.raises(ValueError, match="structured_outputs"):
            _run(async_engine, [("x", _so(**bad))])
    out = _run(async_engine, [("Phone:", _so(regex=r"\d{3}"))])[0].outputs[0]
    assert re.fullmatch(r"\d{3}", out.text)


def test_ebnf_on_guidance_and_a_constraint_that_matches_nothing(async_engine):
    out = _run(async_engine, [("Math:", _so(max_tokens=48, grammar=ARITH, backend="guidance"))])[0].outputs[0]
    assert out.finish_reason == "length" or _arith_ok(out.text), out.text
    with pytest.raises(ValueError, match="admits no text"):  # no output could satisfy it: refused, not ignored
        _run(async_engine, [("x", _so(regex="[^\\x00-\\U0010FFFF]"))])
    with pytest.raises(ValueError, match="EBNF parser error(?s:.*)guidance: (?!'module')"):
        _run(async_engine, [("x", _so(grammar="root ::= "))])


def test_compiled_grammars_are_cached(async_engine):
    schema = {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["k"]}
    _run(async_engine, [("x", _so(max_tokens=30, json=schema, disable_any_whitespace=True)),
                        ("y", _so(max_tokens=30, json=json.dumps(schema), disable_any_whitespace=True))])
    backend = async_engine.native_engine.input_processor._grammars
    p = StructuredOutputsParams(json=schema)
    assert backend.compile(p)[1] is backend.compile(StructuredOutputsParams(json=dict(schema)))[1]


def test_with_stop_strings_min_tokens_logprobs_and_long_prompts(async_engine):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"]}
    long_prompt = "Describe the item in JSON. " * 60  # several chunks of prefill with a small token budget
    # any_whitespace (the default) lets a sampled model pad with whitespace up to max_tokens: compact here
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    jobs = [(long_prompt, SamplingParams(temperature=1.0, max_tokens=60, logprobs=2, min_tokens=3, structured_outputs=so)),
            (long_prompt, SamplingParams(temperature=1.0, max_tokens=60, stop=['"n"'], structured_outputs=so)),
            # min_tokens beyond what the grammar allows: the grammar wins, the output is complete
            ("Pick:", SamplingParams(temperature=1.0, max_tokens=20, min_tokens=10,
                                     structured_outputs=StructuredOutputsParams(choice=["a", "b"])))]
    a, b, c = (o.outputs[0] for o in _run(async_engine, jobs))
    jsonschema.validate(json.loads(a.text), schema)
    assert len(a.logprobs) == len(a.token_ids) and all(len(lp) >= 2 for lp in a.logprobs)
    assert b.finish_reason == "stop" and '"n"' not in b.text and b.text.startswith("{")
    assert c.text in ("a", "b")


def test_preemption_rebuilds_or_keeps_the_matcher(tmp_path):
    """A KV cache too small for all requests at once: requests are preempted and recomputed, outputs stay valid."""
    from conftest import engine_args

    from furiosa_llm import LLMEngine

    engine = LLMEngine.from_engine_args(engine_args(num_kv_blocks=8, block_size=16, max_num_batched_tokens=64, seed=1))
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 9}, "minItems": 12, "maxItems": 20}},
              "required": ["xs"]}
    try:
        for i in range(4):
            engine.add_request(str(i), f"Request {i}: list numbers as JSON. " * 3,
                               SamplingParams(temperature=1.0, max_tokens=60, structured_outputs=StructuredOutputsParams(
                                   json=schema, disable_any_whitespace=True)))
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        stats = engine.native_engine.core.stats()
    finally:
        engine.shutdown()
    assert len(done) == 4
    for out in done.values():
        c = out.outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
        else:
            assert c.finish_reason == "length"
    assert stats.num_preemptions > 0


# ---- the simulator: synthetic tokens follow the grammar; its work is host time ----------------------
def test_simulator_synthetic_tokens_follow_the_grammar_and_cost_host_time():
    import simpy
    from transformers import AutoTokenizer

    from conftest import CACHE_DIR
    from furiosa_llm.hal import Batch, SamplingSettings, SequenceChunk
    from furiosa_llm.hal.cost_model import BatchShape, load_model_shape, rngd_cost_model
    from furiosa_llm.hal.simulator import SimQueue, SyntheticTokens
    from furiosa_llm.model.loader import _gguf_cache_folder, resolve_model
    from furiosa_llm.model.structured_outputs import GrammarBackend

    from conftest import MODEL

    tok = AutoTokenizer.from_pretrained(_gguf_cache_folder(resolve_model(MODEL), CACHE_DIR))
    grammars = GrammarBackend(tok, 49152, {2}, "xgrammar")
    state = grammars.new_state(StructuredOutputsParams(regex=r"(ab|cd){2,4}x"))
    env = simpy.Environment()
    m = load_model_shape("llama-3.1-8b")
    cost = rngd_cost_model(8, model=m)
    q = SimQueue(env, m, cost, SyntheticTokens(), limit=1)
    constrained = SamplingSettings(structured=state, stop_token_ids=frozenset({2}))
    out: list[int] = []
    for step in range(12):
        batch = Batch(step, [SequenceChunk("g", [1], 10 + step, [0], True, constrained, len(out), (), list(out)),
                             SequenceChunk("u", [1], 10 + step, [0], True, SamplingSettings())])
        q.submit(batch)
        res = q.wait()
        assert res.sampled["u"] == 1
        assert res.host_s == cost.host_time(BatchShape.of(batch))
        assert BatchShape.of(batch).num_grammar_rows == 1
        out.append(res.sampled["g"])
        if out[-1] == 2:
            break
    text = tok.decode(out[:-1])
    assert out[-1] == 2 and re.fullmatch(r"(ab|cd){2,4}x", text), text
    plain = Batch(0, [SequenceChunk("u", [1], 5, [0], True, SamplingSettings())])
    assert cost.host_time(BatchShape.of(batch)) - cost.host_time(BatchShape.of(plain)) >= cost.host_s_per_grammar_row


def test_masks_of_interleaved_constrained_rows():
    """Constrained rows anywhere in the batch get their own grammar's mask; the others are untouched."""
    import torch
    from transformers import AutoTokenizer

    from conftest import CACHE_DIR, MODEL
    from furiosa_llm.hal import SamplingSettings, SequenceChunk
    from furiosa_llm.model.loader import _gguf_cache_folder, resolve_model
    from furiosa_llm.model.structured_outputs import GrammarBackend, accept_tokens, apply_grammar_masks

    tok = AutoTokenizer.from_pretrained(_gguf_cache_folder(resolve_model(MODEL), CACHE_DIR))
    grammars = GrammarBackend(tok, 49152, {2}, "auto")
    digits = grammars.new_state(StructuredOutputsParams(regex="[0-9]+"))
    word = grammars.new_state(StructuredOutputsParams(choice=["hello"]))
    settings = [SamplingSettings(), SamplingSettings(structured=digits), SamplingSettings(),
                SamplingSettings(structured=word), SamplingSettings()]
    chunks = [SequenceChunk(str(i), [1], 3, [0], True, s) for i, s in enumerate(settings)]
    logits = torch.randn(5, 49152)
    scores = apply_grammar_masks(logits, logits, chunks)
    assert scores is not logits and torch.equal(scores[[0, 2, 4]], logits[[0, 2, 4]])
    allowed1 = torch.nonzero(~torch.isneginf(scores[1])).flatten().tolist()
    assert allowed1 and all(tok.decode([t]).isdigit() for t in allowed1)
    allowed3 = torch.nonzero(~torch.isneginf(scores[3])).flatten().tolist()
    assert allowed3 and all("hello".startswith(tok.decode([t])) for t in allowed3)
    tokens = [0, allowed1[0], 0, allowed3[0], 0]
    accept_tokens(tokens, chunks)
    assert digits.num_accepted == 1 and word.num_accepted == 1 and not digits.failed and not word.failed


def test_structural_tag_constrains_only_inside_its_tags():
    from transformers import AutoTokenizer

    from conftest import CACHE_DIR, MODEL
    from furiosa_llm.model.loader import _gguf_cache_folder, resolve_model
    from furiosa_llm.model.structured_outputs import GrammarBackend

    tok = AutoTokenizer.from_pretrained(_gguf_cache_folder(resolve_model(MODEL), CACHE_DIR))
    grammars = GrammarBackend(tok, 49152, {2}, "auto")
    tag = json.dumps({"type": "structural_tag", "triggers": ["<function="], "structures": [
        {"begin": "<function=f>", "end": "</function>",
         "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}]})
    good = grammars.new_state(StructuredOutputsParams(structural_tag=tag))
    for t in tok.encode('Hi <function=f>{"a": 1}</function> bye'):
        good.accept(t)
    bad = grammars.new_state(StructuredOutputsParams(structural_tag=tag))
    for t in tok.encode('Hi <function=f>{"b": 1}'):
        bad.accept(t)
    assert not good.failed and bad.failed
