"""Conformance: the imports and types of Furiosa-LLM, used the way a Furiosa-LLM program uses them.

Issue 16, "Imports and types": the public module paths (``furiosa_llm.outputs``,
``furiosa_llm.sampling_params``, ``furiosa_llm.llm_engine``, ``furiosa_llm.api``), the public
``SchedulerConfig`` and ``EngineArgs.create_scheduler_config()``, ``SamplingParams``
(``logprobs=True``, ``from_optional``, ``clone``, ``sampling_type``, the 2026.2-era beam-search
fields), ``RequestOutput.num_output_tokens`` / ``num_prompt_tokens`` and the decoded ``prompt`` of
token prompts, ``CompletionOutput.last_token_truncated``, the prompt dicts' extra keys, and text
prompts tokenized without special tokens.
"""

import dataclasses
import logging
import subprocess
import sys

import pytest

from conftest import CACHE_DIR, MODEL


# ---- module paths ------------------------------------------------------------------------------
def test_module_paths_export_the_public_names():
    import furiosa_llm
    from furiosa_llm.api import LLM, RequestOutput, SchedulerConfig
    from furiosa_llm.llm_engine import AsyncLLMEngine, LLMEngine
    from furiosa_llm.outputs import (
        CompletionOutput,
        EmbeddingOutput,
        EmbeddingRequestOutput,
        PoolingOutput,
        PoolingRequestOutput,
        RequestOutputKind,
    )
    from furiosa_llm.outputs import RequestOutput as OutputsRequestOutput
    from furiosa_llm.sampling_params import RequestOutputKind as SPRequestOutputKind
    from furiosa_llm.sampling_params import SamplingParams, SamplingType

    assert RequestOutput is OutputsRequestOutput is furiosa_llm.RequestOutput
    assert RequestOutputKind is SPRequestOutputKind is furiosa_llm.RequestOutputKind
    assert SamplingParams is furiosa_llm.SamplingParams and SamplingType is furiosa_llm.SamplingType
    assert LLM is furiosa_llm.LLM and LLMEngine is furiosa_llm.LLMEngine
    assert AsyncLLMEngine is furiosa_llm.AsyncLLMEngine and CompletionOutput is furiosa_llm.CompletionOutput
    assert SchedulerConfig is furiosa_llm.SchedulerConfig
    assert PoolingRequestOutput is furiosa_llm.PoolingRequestOutput
    # attribute access reaches the modules too, as after `import furiosa_llm`
    assert furiosa_llm.outputs.CompletionOutput is CompletionOutput
    assert furiosa_llm.api.SchedulerConfig is SchedulerConfig
    with pytest.raises(AttributeError):
        furiosa_llm.api.NoSuchThing  # noqa: B018
    # the pooling and embedding types as vLLM shapes them
    emb = EmbeddingRequestOutput.from_base(PoolingRequestOutput("r", PoolingOutput([0.5, 1.5]), [1, 2]))
    assert isinstance(emb.outputs, EmbeddingOutput) and emb.outputs.embedding == [0.5, 1.5]
    assert emb.outputs.hidden_size == 2 and emb.prompt_token_ids == [1, 2] and emb.finished


def test_the_public_modules_are_cheap_to_import():
    code = (
        "import sys\n"
        "import furiosa_llm.outputs, furiosa_llm.sampling_params, furiosa_llm.llm_engine, furiosa_llm.api\n"
        "from furiosa_llm.api import SchedulerConfig, RequestOutput\n"
        "from furiosa_llm.outputs import CompletionOutput\n"
        "from furiosa_llm.sampling_params import SamplingParams\n"
        "from furiosa_llm import SamplingParams, EngineArgs\n"
        "EngineArgs(model='m').create_scheduler_config()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- SchedulerConfig -----------------------------------------------------------------------------
def test_scheduler_config_defaults_are_furiosas():
    from furiosa_llm.api import SchedulerConfig

    sc = SchedulerConfig()
    assert (sc.npu_queue_limit, sc.max_processing_samples, sc.spare_blocks_ratio, sc.is_offline) == (2, 65536, 0.0, False)
    assert sc.prefill_chunk_size is None and sc.scheduler_kind is None and sc.estimation_time_limit_ms is None
    assert SchedulerConfig(npu_queue_limit=4, max_processing_samples=64, spare_blocks_ratio=0.1).npu_queue_limit == 4
    assert SchedulerConfig(is_offline=True).scheduler_kind == "offline"  # as Furiosa-LLM sets it
    assert SchedulerConfig(spare_blocks_ratio=0.1) == SchedulerConfig(spare_blocks_ratio=0.1 + 1e-9)
    assert SchedulerConfig(npu_queue_limit=3) != SchedulerConfig()
    assert dataclasses.is_dataclass(SchedulerConfig)


@pytest.mark.parametrize("kw", [
    dict(npu_queue_limit=0), dict(npu_queue_limit=True), dict(npu_queue_limit=1.5), dict(max_processing_samples=0),
    dict(spare_blocks_ratio=1.0), dict(spare_blocks_ratio=-0.1), dict(spare_blocks_ratio="0.1"),
    dict(is_offline="yes"), dict(prefill_chunk_size=0), dict(scheduler_kind=3), dict(estimation_time_limit_ms=-1),
    dict(enable_prefix_caching="on"),
])
def test_scheduler_config_rejects_bad_values_naming_the_field(kw):
    from furiosa_llm.api import SchedulerConfig

    with pytest.raises(ValueError, match=next(iter(kw))):
        SchedulerConfig(**kw)


def test_engine_args_builds_a_scheduler_config_and_folding_it_back_gives_the_same_engine():
    from furiosa_llm import EngineArgs, SchedulerConfig
    from furiosa_llm.api.scheduler_config import engine_kwargs_from_scheduler_config

    args = EngineArgs(model=MODEL, npu_queue_limit=3, max_processing_samples=40, spare_blocks_ratio=0.25,
                      max_num_batched_tokens=512, enable_prefix_caching=False)
    sc = args.create_scheduler_config()
    assert isinstance(sc, SchedulerConfig)
    assert (sc.npu_queue_limit, sc.max_processing_samples, sc.spare_blocks_ratio) == (3, 40, 0.25)
    assert sc.prefill_chunk_size == 512 and sc.enable_prefix_caching is False
    # engine defaults come out resolved
    d = EngineArgs(model=MODEL).create_scheduler_config()
    assert (d.npu_queue_limit, d.max_processing_samples, d.spare_blocks_ratio) == (1, 65536, 0.0)

    again = EngineArgs(**engine_kwargs_from_scheduler_config(sc, {"model": MODEL}))
    assert again.engine_config(num_blocks=100, model_max_len=2048) == args.engine_config(num_blocks=100, model_max_len=2048)


def test_folding_a_scheduler_config_into_engine_kwargs():
    from furiosa_llm import EngineArgs
    from furiosa_llm.api import SchedulerConfig
    from furiosa_llm.api.scheduler_config import engine_kwargs_from_scheduler_config as fold

    base = {"model": MODEL, "devices": "cpu"}
    assert fold(None, base) == base and fold(None, base) is not base
    kw = fold(SchedulerConfig(npu_queue_limit=4, max_processing_samples=8, spare_blocks_ratio=0.5), base)
    assert kw == {**base, "npu_queue_limit": 4, "max_processing_samples": 8, "spare_blocks_ratio": 0.5}
    cfg = EngineArgs(**kw).engine_config(num_blocks=64, model_max_len=512)
    assert cfg.npu_queue_limit == 4 and cfg.scheduler_config.max_processing_samples == 8
    assert cfg.scheduler_config.spare_blocks_ratio == 0.5
    kw = fold(SchedulerConfig(prefill_chunk_size=256, enable_prefix_caching=False), base)
    assert kw["max_num_batched_tokens"] == 256 and kw["enable_prefix_caching"] is False
    # the same knob both ways: equal is fine, different is an error naming both
    assert fold(SchedulerConfig(npu_queue_limit=2), {**base, "npu_queue_limit": 2})["npu_queue_limit"] == 2
    with pytest.raises(ValueError, match=r"npu_queue_limit=4.*scheduler_config\.npu_queue_limit=2"):
        fold(SchedulerConfig(), {**base, "npu_queue_limit": 4})
    with pytest.raises(ValueError, match="scheduler_config"):
        fold({"npu_queue_limit": 2}, base)


def test_scheduler_hints_without_meaning_here_are_accepted_and_named_in_a_warning(caplog):
    from furiosa_llm.api import SchedulerConfig
    from furiosa_llm.api.scheduler_config import engine_kwargs_from_scheduler_config as fold

    with caplog.at_level(logging.WARNING, logger="furiosa_llm"):
        kw = fold(SchedulerConfig(is_offline=True, estimation_time_limit_ms=10), {"model": MODEL})
    assert "is_offline" not in kw and "estimation_time_limit_ms" not in kw
    assert "is_offline=True" in caplog.text and "estimation_time_limit_ms=10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="furiosa_llm"):
        fold(SchedulerConfig(), {"model": MODEL})
    assert caplog.text == ""


# ---- SamplingParams ------------------------------------------------------------------------------
def test_sampling_params_logprobs_true_is_one():
    from furiosa_llm.sampling_params import SamplingParams

    p = SamplingParams(logprobs=True, prompt_logprobs=True)
    assert p.logprobs == 1 and type(p.logprobs) is int and p.prompt_logprobs == 1
    assert SamplingParams(logprobs=False).logprobs == 0  # vLLM's reading of a bool: False is 0 (the sampled token)
    p.verify(max_logprobs=20, vocab_size=100)


def test_sampling_params_from_optional_none_means_default():
    from furiosa_llm.sampling_params import SamplingParams

    p = SamplingParams.from_optional(n=None, temperature=None, top_p=None, top_k=None, min_p=None,
                                     repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
                                     stop=None, ignore_eos=None, min_tokens=None, skip_special_tokens=None,
                                     best_of=None, use_beam_search=None, length_penalty=None, early_stopping=None,
                                     output_kind=None, extra_args=None, seed=None, logprobs=None)
    defaults = SamplingParams()
    assert p == dataclasses.replace(defaults)
    assert SamplingParams.from_optional(temperature=0.5, top_k=None).temperature == 0.5
    assert SamplingParams.from_optional(max_tokens=None).max_tokens is None  # fills the context, as in Furiosa-LLM
    assert SamplingParams.from_optional().max_tokens == 16
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_optional(temperature=-1.0)
    with pytest.raises(TypeError, match="no_such_field"):
        SamplingParams.from_optional(no_such_field=None)


def test_sampling_params_clone_is_deep():
    from furiosa_llm.sampling_params import SamplingParams

    p = SamplingParams(temperature=0.7, stop=["x"], extra_args={"k": [1]})
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.extra_args["k"].append(2)
    assert p.stop == ["x"] and p.extra_args == {"k": [1]}


def test_sampling_params_sampling_type():
    from furiosa_llm.sampling_params import SamplingParams, SamplingType

    assert [t.name for t in SamplingType] == ["GREEDY", "RANDOM", "RANDOM_SEED"]
    assert SamplingParams(temperature=0).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0, seed=3).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.8).sampling_type is SamplingType.RANDOM
    assert SamplingParams(temperature=0.8, seed=3).sampling_type is SamplingType.RANDOM_SEED


def test_sampling_params_beam_search_fields():
    from furiosa_llm.sampling_params import SamplingParams

    p = SamplingParams(best_of=None, use_beam_search=False, length_penalty=1.0, early_stopping=False)
    assert p.best_of == 1 and p.use_beam_search is False  # best_of defaults to n
    assert SamplingParams(best_of=1).best_of == 1
    with pytest.raises(ValueError, match="use_beam_search=True.*beam search is not supported"):
        SamplingParams(use_beam_search=True, best_of=4, temperature=0.0)
    with pytest.raises(ValueError, match="best_of=0: must be >= n=1"):
        SamplingParams(best_of=0)
    with pytest.raises(ValueError, match="best_of=2"):
        SamplingParams(best_of=2)
    with pytest.raises(ValueError, match="length_penalty=0.5: must be 1.0 without beam search"):
        SamplingParams(length_penalty=0.5)
    with pytest.raises(ValueError, match="early_stopping=True: must be False without beam search"):
        SamplingParams(early_stopping=True)
    with pytest.raises(ValueError, match="early_stopping='sometimes': must be True, False or 'never'"):
        SamplingParams(early_stopping="sometimes")


# ---- RequestOutput and CompletionOutput as values -------------------------------------------------
def test_request_output_counts_and_last_token_truncated_default():
    from furiosa_llm.outputs import CompletionOutput, RequestOutput

    comp = CompletionOutput(index=0, text="ab", token_ids=[5, 6, 7])
    assert comp.last_token_truncated is False
    out = RequestOutput(request_id="r", prompt="p", prompt_token_ids=[1, 2], prompt_logprobs=None, outputs=[comp],
                        finished=True)
    assert out.num_prompt_tokens == 2 and out.num_output_tokens == 3


# ---- prompt dicts and tokenization (no engine) ------------------------------------------------------
class _BosTokenizer:
    """A tokenizer that adds a BOS token (id 1) unless ``add_special_tokens=False``; one id per character."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [10 + ord(c) % 50 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_text_prompts_are_tokenized_without_special_tokens():
    from furiosa_llm.api.inputs import parse_prompt

    tok = _BosTokenizer()
    assert parse_prompt("ab", tok, 100) == ("ab", tok.encode("ab", add_special_tokens=False))
    assert parse_prompt({"prompt": "ab"}, tok, 100)[1][0] != 1


def test_prompt_dicts_accept_and_ignore_the_extra_keys():
    from furiosa_llm import TextPrompt, TokensPrompt
    from furiosa_llm.api.inputs import parse_prompt

    tok = _BosTokenizer()
    extra = dict(multi_modal_data={}, mm_processor_kwargs={"size": 3}, cache_salt="salt")
    assert parse_prompt(TextPrompt(prompt="ab", **extra), tok, 100)[0] == "ab"
    assert parse_prompt(TokensPrompt(prompt_token_ids=[3, 4], **extra), tok, 100) == (None, [3, 4])
    assert parse_prompt(TokensPrompt(prompt_token_ids=[3, 4], prompt="hi"), tok, 100) == ("hi", [3, 4])
    assert parse_prompt({"prompt": "ab", "multi_modal_data": None}, tok, 100)[0] == "ab"
    for bad, name in [
        ({"prompt": "ab", "multi_modal_data": {"image": object()}}, "multi_modal_data.*text-only"),
        ({"prompt_token_ids": [3], "multi_modal_data": {"audio": b""}}, "multi_modal_data.*text-only"),
        ({"prompt": "ab", "cache_salt": 5}, "cache_salt"),
        ({"prompt": "ab", "mm_processor_kwargs": [1]}, "mm_processor_kwargs"),
        ({"prompt_token_ids": [3], "prompt": 5}, "prompt=5"),
        ({"prompt": "ab", "images": []}, "unknown key.*'images'"),
        ({"cache_salt": "s"}, "expected a str"),
    ]:
        with pytest.raises(ValueError, match=name):
            parse_prompt(bad, tok, 100)


# ---- with the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    from furiosa_llm.api import LLM

    engine = LLM(MODEL, cache_dir=CACHE_DIR, devices="cpu", num_kv_blocks=64, max_model_len=256)
    yield engine
    shutdown = getattr(engine, "shutdown", None)
    (shutdown or engine.llm_engine.shutdown)()


def _one(llm, prompt, params):
    outs = llm.generate([prompt], params, use_tqdm=False)
    assert len(outs) == 1
    return outs[0]


def test_request_output_from_the_engine(llm):
    from furiosa_llm.outputs import RequestOutput
    from furiosa_llm.sampling_params import SamplingParams

    tok = llm.get_tokenizer()
    text = "The capital of France is"
    out = _one(llm, text, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert isinstance(out, RequestOutput) and out.prompt == text
    assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)  # no special tokens added
    assert out.num_prompt_tokens == len(out.prompt_token_ids) and out.num_output_tokens == 5
    assert out.outputs[0].last_token_truncated is False

    # a token prompt: `prompt` is the decoded text of its ids
    ids = tok.encode(text, add_special_tokens=False)
    by_ids = _one(llm, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert by_ids.prompt == tok.decode(ids) == text and by_ids.outputs[0].token_ids == out.outputs[0].token_ids
    # ... or the text it carries
    carried = _one(llm, {"prompt_token_ids": ids, "prompt": "carried"}, SamplingParams(max_tokens=1))
    assert carried.prompt == "carried" and carried.prompt_token_ids == ids
    # extra keys accepted and ignored; multimodal data refused before anything runs
    salted = _one(llm, {"prompt": text, "cache_salt": "s", "mm_processor_kwargs": {}, "multi_modal_data": {}},
                  SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert salted.outputs[0].token_ids == out.outputs[0].token_ids
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate([{"prompt": text, "multi_modal_data": {"image": "x.png"}}], SamplingParams(), use_tqdm=False)


def test_last_token_truncated_by_a_stop_string_inside_the_last_token(llm):
    from furiosa_llm.sampling_params import SamplingParams

    tok = llm.get_tokenizer()
    prompt = "Write a poem about the sea and the sky."
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = _one(llm, prompt, greedy).outputs[0]
    ids, text = full.token_ids, full.text
    # where each token's text ends in the output text (this byte-level tokenizer decodes prefixes consistently)
    ends = [len(tok.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    assert tok.decode(ids, skip_special_tokens=True) == text and ends == sorted(ends)
    # the first token with at least two characters of text, after the first token
    k = next(i for i in range(1, len(ids)) if ends[i] - ends[i - 1] >= 2)
    inside, boundary = text[: ends[k - 1] + 1], text[: ends[k]]  # ends one character into token k / at its end

    def run(stop, include):
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                include_stop_str_in_output=include)
        return _one(llm, prompt, params).outputs[0]

    cut = run(inside, include=True)
    assert cut.finish_reason == "stop" and cut.stop_reason == inside and cut.token_ids == ids[: k + 1]
    assert cut.text == inside and cut.last_token_truncated is True
    gone = run(inside, include=False)
    assert gone.text == "" and gone.last_token_truncated is True  # the stop string's part of the token is cut
    whole = run(boundary, include=True)
    assert whole.text == boundary and whole.token_ids == ids[: k + 1] and whole.last_token_truncated is False
    assert _one(llm, prompt, greedy).outputs[0].last_token_truncated is False  # ended by length


def test_chat_adds_what_the_template_adds(llm):
    from furiosa_llm.sampling_params import SamplingParams

    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hi"}]
    outs = llm.chat(messages, sampling_params=SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    out = outs[0] if isinstance(outs, list) else outs
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    assert out.prompt == tok.decode(expected)  # a token prompt's text: the templated conversation
    assert out.prompt.startswith("<|im_start|>")  # the template's special tokens are in, added by the template
