import argparse

import pytest

from furiosa_llm import AsyncEngineArgs, EngineArgs, SamplingParams


def parse(*argv):
    p = AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    return AsyncEngineArgs.from_cli_args(p.parse_args(["--model", "m", *argv]))


def test_cli_defaults_match_the_seed():
    a = parse()
    assert (a.jit_threshold, a.jit_max_workers, a.jit_unit_size, a.enable_jit_compilation) == (5, 15, 8, False)
    assert a.npu_queue_limit is None and a.resolved_npu_queue_limit == 1
    assert a.max_processing_samples is None and a.resolved_max_processing_samples == 65536
    assert a.spare_blocks_ratio is None and a.resolved_spare_blocks_ratio == 0.0
    assert a.cache_dir.endswith("furiosa/llm") and a.tokenizer_mode == "auto"
    b = parse("--devices", "npu:0:0-3,npu:1", "--enable-jit-compilation", "true", "--cache-dir", "none", "--seed", "3")
    assert b.enable_jit_compilation is True and b.cache_dir is None and b.seed == 3
    assert [str(d) for d in b.parsed_devices()] == ["npu:0:0-3", "npu:1"]


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(npu_queue_limit=0), "npu_queue_limit"),
        (dict(max_processing_samples=0), "max_processing_samples"),
        (dict(spare_blocks_ratio=1.0), "spare_blocks_ratio"),
        (dict(spare_blocks_ratio=-0.1), "spare_blocks_ratio"),
        (dict(jit_threshold=0), "jit_threshold"),
        (dict(jit_max_workers=0), "jit_max_workers"),
        (dict(jit_unit_size=1), "jit_unit_size"),
        (dict(devices="npu:0:1-2"), "npu:0:1-2"),
        (dict(tokenizer_mode="fast"), "tokenizer_mode"),
        (dict(pipeline_parallel_size=0), "pipeline_parallel_size"),
        (dict(enable_jit_compilation="yes"), "enable_jit_compilation"),
        (dict(max_logprobs=-2), "max_logprobs"),
        (dict(max_logprobs=True), "max_logprobs"),
        (dict(max_logprobs="20"), "max_logprobs"),
    ],
)
def test_engine_args_validation_names_the_flag(kw, name):
    with pytest.raises(ValueError, match=name):
        EngineArgs(model="m", **kw)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(n=2), "n="),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=2.5), "repetition_penalty"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(logprobs=-2), "logprobs"),
        (dict(prompt_logprobs=-2), "prompt_logprobs"),
        (dict(stop=3), "stop"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(temperature="hot"), "temperature"),
    ],
)
def test_sampling_params_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_max_logprobs_flag():
    assert parse().max_logprobs == 20  # vLLM's default
    assert parse("--max-logprobs", "-1").max_logprobs == -1  # the whole vocabulary
    assert parse("--max-logprobs", "0").max_logprobs == 0
    with pytest.raises(ValueError, match="max_logprobs=-5"):
        parse("--max-logprobs", "-5")


def test_sampling_params_normalise():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["", "y"]).stop == ["y"]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_npu_without_driver_is_a_clear_error():
    from furiosa_llm import LLMEngine

    with pytest.raises(ValueError, match=r"npu:0.*available: cpu"):
        LLMEngine(EngineArgs(model="smollm2-135m-instruct", devices="npu:0"))


def test_unknown_model_is_a_clear_error(tmp_path):
    from furiosa_llm.model.loader import resolve_model

    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        resolve_model("nobody/no-such-model")
    (tmp_path / "x.bin").write_text("x")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_model(str(tmp_path / "x.bin"))


_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}


@pytest.mark.parametrize("config,needle", [
    ({**_LLAMA, "num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
    ({**_LLAMA, "num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({**_LLAMA, "intermediate_size": -5}, "intermediate_size=-5"),
    ({k: v for k, v in _LLAMA.items() if k != "model_type"}, "model_type is missing"),
    ({**_LLAMA, "model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ({**_LLAMA, "model_type": "qwen2", "sliding_window": 16, "use_sliding_window": True}, "sliding_window=16"),
    # no context length given: the window is in use (this raised a TypeError, comparing with None)
    ({**_LLAMA, "model_type": "mistral", "sliding_window": 16, "max_position_embeddings": None}, "sliding_window=16"),
    ({**_LLAMA, "hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4"),
    ([1, 2], "expected a JSON object"),
    ("{not json", "is not JSON"),
])
def test_a_model_config_the_engine_cannot_run_is_refused_at_load(tmp_path, config, needle):
    """Found by a fresh user: num_key_value_heads=3 of 4 heads loaded, then every step failed until the engine was
    declared dead; a Mistral sliding window was ignored (wrong text past the window); zero layers divided by zero."""
    import json

    from furiosa_llm.model.loader import load_model_and_tokenizer, resolve_model

    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        load_model_and_tokenizer(resolve_model(str(tmp_path)), cache_dir=None)


def test_a_qwen2_config_with_its_sliding_window_off_is_accepted():
    from furiosa_llm.model.loader import check_decoder_config

    cfg = {**_LLAMA, "model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}
    assert check_decoder_config(cfg, "test") is cfg
    assert check_decoder_config({**_LLAMA, "model_type": "mistral", "sliding_window": None}, "test")
    # a window as long as the context never drops a position
    assert check_decoder_config({**_LLAMA, "model_type": "mistral", "sliding_window": 4096,
                                 "max_position_embeddings": 4096}, "test")


def test_a_broken_config_json_is_named_by_the_engine(tmp_path):
    """The torch backend peeked at config.json (is it an encoder?) before the loader's check and raised a bare
    JSONDecodeError or AttributeError (found by a fresh user)."""
    from furiosa_llm import LLM

    for text, needle in (("{bad", "is not JSON"), ("[1, 2]", "expected a JSON object")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=needle):
            LLM(str(tmp_path), devices="cpu")
