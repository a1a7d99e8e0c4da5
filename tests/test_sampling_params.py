"""SamplingParams validation: every field's type and range at construction, the engine's bounds at
``verify`` (when a request is added), and a property: any keyword values either give a ValueError or
a request that completes, and the engine serves on."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from furiosa_llm import EngineArgs, RequestOutputKind, SamplingParams, StructuredOutputsParams

from conftest import CACHE_DIR, MODEL

VOCAB = 49152  # the embedded model's vocabulary size
NAN, INF = float("nan"), float("inf")

# ---- the rule of every field, as (keywords, accepted?) -----------------------------------------
# Rejected values must raise ValueError naming the field; accepted ones construct (and pass
# verify with the default engine: max_logprobs=20, the embedded vocabulary).
RULES = [
    # every int field: an int in int64 (a bool is not an int); counts have their own bounds below
    (dict(max_tokens=2**63), False), (dict(top_k=-(2**63) - 1), False), (dict(logprobs=10**5000), False),
    (dict(max_tokens=-(10**5000)), False), (dict(stop_token_ids=[2**63]), False), (dict(stop_token_ids=[10**5000]), False),
    # n: an int, only 1
    (dict(n=1), True), (dict(n=2), False), (dict(n=0), False), (dict(n=True), False), (dict(n=1.0), False),
    # temperature: a finite number in [0, 1e6]; < 1e-5 is greedy
    (dict(temperature=0), True), (dict(temperature=1e6), True), (dict(temperature=NAN), False),
    (dict(temperature=INF), False), (dict(temperature=-INF), False), (dict(temperature=-0.1), False),
    (dict(temperature=1e300), False), (dict(temperature=10**400), False), (dict(temperature="hot"), False),
    (dict(temperature=None), False), (dict(temperature=True), False),
    # top_p: a finite number in (0, 1]
    (dict(top_p=1), True), (dict(top_p=1e-300), True), (dict(top_p=0), False), (dict(top_p=1.5), False),
    (dict(top_p=NAN), False), (dict(top_p=INF), False), (dict(top_p="1"), False),
    # top_k: an int, -1 or 0 (off) or >= 1; at most the vocabulary (verify)
    (dict(top_k=-1), True), (dict(top_k=0), True), (dict(top_k=VOCAB), True), (dict(top_k=-2), False),
    (dict(top_k=VOCAB + 1), False), (dict(top_k=10**30), False), (dict(top_k=2.0), False), (dict(top_k=False), False),
    # min_p: a finite number in [0, 1]
    (dict(min_p=0), True), (dict(min_p=1), True), (dict(min_p=-0.1), False), (dict(min_p=1.5), False),
    (dict(min_p=NAN), False), (dict(min_p=-INF), False),
    # repetition_penalty: a finite number in [1e-6, 2] (below, logit / penalty overflows float32)
    (dict(repetition_penalty=1e-6), True), (dict(repetition_penalty=2), True), (dict(repetition_penalty=0), False),
    (dict(repetition_penalty=1e-300), False), (dict(repetition_penalty=2.5), False),
    (dict(repetition_penalty=NAN), False), (dict(repetition_penalty=INF), False),
    # presence_penalty, frequency_penalty: finite numbers in [-2, 2] (OpenAI's range, as vLLM)
    (dict(presence_penalty=-2), True), (dict(presence_penalty=3), False), (dict(presence_penalty=NAN), False),
    (dict(presence_penalty=-INF), False), (dict(frequency_penalty=2), True), (dict(frequency_penalty=-3), False),
    (dict(frequency_penalty=NAN), False), (dict(frequency_penalty=INF), False),
    # seed: None or an int that torch.Generator.manual_seed accepts, [-2**63, 2**64) (negative ones are
    # mixed into [0, 2**63) by the sampler); not a bool
    (dict(seed=None), True), (dict(seed=-1), True), (dict(seed=-(2**63)), True), (dict(seed=2**64 - 1), True),
    (dict(seed=2**64), False), (dict(seed=-(2**63) - 1), False), (dict(seed=10**30), False),
    (dict(seed=True), False), (dict(seed=1.5), False), (dict(seed="1"), False),
    # stop: None, a str or a list of str
    (dict(stop="x"), True), (dict(stop=["x", ""]), True), (dict(stop=3), False), (dict(stop=["x", 1]), False),
    (dict(stop=[None]), False),
    # stop_token_ids: None or a list of ints in [0, vocabulary) (the upper bound at verify); not bools
    (dict(stop_token_ids=[0, VOCAB - 1]), True), (dict(stop_token_ids=[-1]), False),
    (dict(stop_token_ids=[VOCAB]), False), (dict(stop_token_ids=[10**30]), False),
    (dict(stop_token_ids=[True]), False), (dict(stop_token_ids=["a"]), False), (dict(stop_token_ids=5), False),
    (dict(stop_token_ids=[1.0]), False),
    # booleans: True or False only
    (dict(include_stop_str_in_output=True), True), (dict(include_stop_str_in_output=1), False),
    (dict(ignore_eos=False), True), (dict(ignore_eos="yes"), False), (dict(ignore_eos=None), False),
    (dict(skip_special_tokens=False), True), (dict(skip_special_tokens=0), False),
    # max_tokens: None or an int >= 1 (<= max_model_len - prompt at add time, LLMEngine.add_request)
    (dict(max_tokens=None), True), (dict(max_tokens=1), True), (dict(max_tokens=0), False),
    (dict(max_tokens=-1), False), (dict(max_tokens=1.0), False), (dict(max_tokens=True), False),
    # min_tokens: an int in [0, max_tokens]
    (dict(min_tokens=0), True), (dict(min_tokens=16), True), (dict(min_tokens=-1), False),
    (dict(min_tokens=5, max_tokens=2), False), (dict(min_tokens=None), False), (dict(min_tokens=NAN), False),
    # logprobs, prompt_logprobs: None, an int >= 0 or -1 (the whole vocabulary); <= max_logprobs (verify)
    (dict(logprobs=0), True), (dict(logprobs=20), True), (dict(logprobs=21), False), (dict(logprobs=-1), False),
    (dict(logprobs=-2), False), (dict(logprobs=10**30), False), (dict(logprobs=1.0), False), (dict(logprobs="1"), False),
    (dict(logprobs=True), True), (dict(prompt_logprobs=True), True),  # True is 1 (vLLM, Furiosa-LLM)
    (dict(prompt_logprobs=0), True), (dict(prompt_logprobs=20), True), (dict(prompt_logprobs=21), False),
    (dict(prompt_logprobs=-1), False), (dict(prompt_logprobs=-2), False), (dict(prompt_logprobs="5"), False),
    # output_kind: a RequestOutputKind
    (dict(output_kind=RequestOutputKind.DELTA), True), (dict(output_kind=1), False), (dict(output_kind="DELTA"), False),
    # extra_args: None or a dict
    (dict(extra_args=None), True), (dict(extra_args={"a": 1}), True), (dict(extra_args=[1]), False),
    # structured_outputs: None or a StructuredOutputsParams
    (dict(structured_outputs=None), True), (dict(structured_outputs=StructuredOutputsParams(regex="a+")), True),
    (dict(structured_outputs={"regex": "a+"}), False),
    # the 2026.2-era beam-search fields: accepted with their rules; beam search itself is refused
    (dict(best_of=None), True), (dict(best_of=1), True), (dict(best_of=2), False), (dict(best_of=0), False),
    (dict(best_of=True), False), (dict(use_beam_search=False), True), (dict(use_beam_search=True), False),
    (dict(use_beam_search=1), False), (dict(length_penalty=1.0), True), (dict(length_penalty=1), True),
    (dict(length_penalty=0.5), False), (dict(length_penalty=NAN), False), (dict(early_stopping=False), True),
    (dict(early_stopping=True), False), (dict(early_stopping="never"), False), (dict(early_stopping="sometimes"), False),
]


def _check(kw, *, max_logprobs=20, vocab_size=VOCAB):
    SamplingParams(**kw).verify(max_logprobs=max_logprobs, vocab_size=vocab_size)


def _id(kw, ok):
    try:
        return f"{'ok' if ok else 'bad'}-{kw!r:.60}"
    except ValueError:  # an int too long to print
        return f"{'ok' if ok else 'bad'}-{next(iter(kw))}-huge"


@pytest.mark.parametrize("kw,ok", RULES, ids=[_id(kw, ok) for kw, ok in RULES])
def test_field_rules(kw, ok):
    if ok:
        _check(kw)
        return
    name = next(iter(kw))  # the field under test comes first
    with pytest.raises(ValueError, match=name) as e:
        _check(kw)
    assert "must" in str(e.value) or "expected" in str(e.value)  # says what is allowed


def test_every_field_has_a_rule():
    import dataclasses

    covered = {k for kw, _ in RULES for k in kw}
    assert covered == {f.name for f in dataclasses.fields(SamplingParams)}


def test_normalised_values():
    p = SamplingParams(temperature=1, top_k=0, seed=-5, stop=("a", ""), stop_token_ids=(3,), extra_args=None)
    assert isinstance(p.temperature, float) and p.stop == ["a"] and p.stop_token_ids == [3] and p.extra_args == {}
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize(
    "kw,max_logprobs,ok",
    [
        (dict(logprobs=-1), -1, True),  # the whole vocabulary, allowed by max_logprobs=-1
        (dict(prompt_logprobs=-1), -1, True),
        (dict(logprobs=-1), VOCAB, True),
        (dict(logprobs=-1), VOCAB - 1, False),
        (dict(logprobs=VOCAB), -1, True),
        (dict(logprobs=VOCAB + 1), -1, False),
        (dict(prompt_logprobs=5), 4, False),
        (dict(logprobs=0), 0, True),
        (dict(logprobs=1), 0, False),
    ],
)
def test_verify_max_logprobs(kw, max_logprobs, ok):
    if ok:
        _check(kw, max_logprobs=max_logprobs)
    else:
        with pytest.raises(ValueError, match=rf"{next(iter(kw))}=.*max_logprobs={max_logprobs}"):
            _check(kw, max_logprobs=max_logprobs)


def test_verify_checks_fields_changed_after_construction():
    p = SamplingParams()
    p.temperature = NAN
    with pytest.raises(ValueError, match="temperature"):
        p.verify(max_logprobs=20, vocab_size=VOCAB)


def test_token_logprobs_whole_vocabulary():
    import torch

    from furiosa_llm.model.sampler import token_logprobs

    row = torch.log_softmax(torch.tensor([0.5, 2.0, -1.0]), dim=-1)
    entries = token_logprobs(row, 0, -1)
    assert [e.token_id for e in entries] == [0, 1, 0, 2] and entries[0].rank == 2
    assert len(token_logprobs(row, 1, 10)) == 4  # more than the vocabulary: all of it


# ---- the property ------------------------------------------------------------------------------
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 2**63, 2**64, -(2**63) - 1, 10**400, 10**5000]),
    st.floats(),  # NaN, inf, -inf, subnormals and huge values included
    st.text(max_size=4),
    st.lists(st.one_of(st.integers(), st.text(max_size=2), st.none(), st.booleans(), st.floats()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from(list(RequestOutputKind)),
)
_UNIT = st.floats(0, 1)
_VALID = {
    "n": st.just(1),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([1e-5, 1e6])),
    "top_p": st.floats(1e-6, 1),
    "top_k": st.one_of(st.integers(-1, 100), st.just(VOCAB)),
    "min_p": _UNIT,
    "repetition_penalty": st.one_of(st.floats(0.5, 2), st.just(1e-6)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), max_size=3)),
    "include_stop_str_in_output": st.booleans(),
    "ignore_eos": st.booleans(),
    "max_tokens": st.one_of(st.none(), st.integers(1, 2**63 - 1)),
    "min_tokens": st.integers(0, 10),
    "logprobs": st.one_of(st.none(), st.integers(-1, 25)),
    "prompt_logprobs": st.one_of(st.none(), st.integers(-1, 25)),
    "skip_special_tokens": st.booleans(),
    "output_kind": st.sampled_from(list(RequestOutputKind)),
    "extra_args": st.one_of(st.none(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
}
FIELDS = sorted(_VALID)


def _kwargs():
    """Keyword dicts over any subset of the fields; each value valid or junk (NaN, inf, huge, wrong type)."""
    value = {n: st.one_of(_VALID[n], _JUNK) for n in FIELDS}
    names = st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS))
    return names.flatmap(lambda ns: st.fixed_dictionaries({n: value[n] for n in ns}))


def _mostly_valid_kwargs():
    """Valid values for any subset of the fields, and at most one field junk: most examples reach the engine."""
    names = st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS))
    valid = names.flatmap(lambda ns: st.fixed_dictionaries({n: _VALID[n] for n in ns}))
    junk = st.one_of(st.just({}), st.tuples(st.sampled_from(FIELDS), _JUNK).map(lambda t: {t[0]: t[1]}))
    return st.tuples(valid, junk).map(lambda t: {**t[0], **t[1]})


def _build(kw, *, max_logprobs=20, vocab_size=VOCAB):
    """A verified SamplingParams, or None after a ValueError that names a field given; anything else fails."""
    try:
        p = SamplingParams(**kw)
        p.verify(max_logprobs=max_logprobs, vocab_size=vocab_size)
    except ValueError as e:
        assert any(f"{name}=" in str(e) for name in kw), str(e)
        return None
    return p


@settings(max_examples=600, deadline=None)
@given(kw=_kwargs(), max_logprobs=st.sampled_from([0, 20, -1]))
def test_any_keywords_are_accepted_or_a_value_error(kw, max_logprobs):
    p = _build(kw, max_logprobs=max_logprobs)
    if p is None:
        return
    # an accepted value is a sane one
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert isinstance(getattr(p, name), float) and math.isfinite(getattr(p, name))
    assert p.settings() is not None


@pytest.fixture(scope="module")
def llm():
    from furiosa_llm import LLM

    engine = LLM(MODEL, cache_dir=CACHE_DIR, devices="cpu", num_kv_blocks=64, max_model_len=256)
    assert engine.llm_engine.vocab_size == VOCAB
    yield engine
    engine.llm_engine.shutdown()


def _serves(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert out[0].finished and len(out[0].outputs[0].token_ids) >= 1
    assert not llm.llm_engine.has_unfinished_requests()


def _cheap(kw: dict) -> dict:
    """Cap a *valid* max_tokens (and min_tokens) at 4 so a run stays short; invalid values stay as drawn."""
    kw = dict(kw)
    mt = kw.get("max_tokens", 16)
    if mt is None or (isinstance(mt, int) and not isinstance(mt, bool) and mt >= 1):
        kw["max_tokens"] = min(mt or 4, 4)
    mn = kw.get("min_tokens")
    if isinstance(mn, int) and not isinstance(mn, bool) and mn >= 0:
        kw["min_tokens"] = min(mn, kw["max_tokens"]) if isinstance(kw["max_tokens"], int) else mn
    return kw


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=_mostly_valid_kwargs())
def test_any_keywords_complete_or_value_error_and_engine_serves(llm, kw):
    kw = _cheap(kw)
    try:
        params = SamplingParams(**kw)
    except ValueError:
        _serves(llm)
        return
    try:
        out = llm.generate(["Hi there", {"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    except ValueError as e:  # refused when the request is added (verify, max_model_len)
        assert str(e)
    else:
        for o in out:
            c = o.outputs[0]
            assert o.finished and c.finish_reason in ("stop", "length") and 1 <= len(c.token_ids) <= 4
            if params.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)
            if params.prompt_logprobs is not None:
                assert len(o.prompt_logprobs) == len(o.prompt_token_ids)
    _serves(llm)


@pytest.mark.parametrize(
    "kw",
    [
        dict(seed=-7, temperature=1.0), dict(seed=2**64 - 1, temperature=1.0), dict(seed=-(2**63), temperature=0.7),
        dict(temperature=1e6), dict(temperature=1e-5, top_k=VOCAB),
        dict(repetition_penalty=1e-6, temperature=1.0), dict(repetition_penalty=2, presence_penalty=-2, frequency_penalty=2),
        dict(top_p=1e-300, min_p=1.0, temperature=1.0),
        dict(logprobs=20, prompt_logprobs=20), dict(logprobs=0, prompt_logprobs=0),
        dict(stop_token_ids=[VOCAB - 1, 0], min_tokens=2), dict(ignore_eos=True, skip_special_tokens=False),
    ],
    ids=repr,
)
def test_edge_values_complete(llm, kw):
    outs = llm.generate(["The sky is"], SamplingParams(**_cheap(kw)), use_tqdm=False)
    c = outs[0].outputs[0]
    assert outs[0].finished and 1 <= len(c.token_ids) <= 4
    if kw.get("logprobs") is not None:
        assert all(math.isfinite(e[t].logprob) or e[t].logprob == -INF for e, t in zip(c.logprobs, c.token_ids))
    _serves(llm)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(logprobs=21), "logprobs=21"), (dict(prompt_logprobs=-1), "prompt_logprobs=-1"),
        (dict(top_k=VOCAB + 1), "top_k"), (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(max_tokens=2**63 - 1), "max_tokens"), (dict(max_tokens=None, min_tokens=2**63 - 1), "min_tokens"),
    ],
)
def test_refused_when_added(llm, kw, match):
    with pytest.raises(ValueError, match=match):
        llm.generate("Hi", SamplingParams(**kw), use_tqdm=False)
    _serves(llm)


def test_max_logprobs_reaches_the_engine():
    assert EngineArgs(model="m").max_logprobs == 20
    assert EngineArgs(model="m", max_logprobs=-1).max_logprobs == -1
