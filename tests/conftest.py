import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from hypothesis import HealthCheck, settings

# "ci" is bounded to a few minutes; "soak" runs far more examples for long tuning runs.
# Select with HYPOTHESIS_PROFILE=soak or pytest --hypothesis-profile=soak.
settings.register_profile("ci", max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", max_examples=5000, stateful_step_count=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
# converted weights of the embedded model are cached here once and reused by every test
CACHE_DIR = os.environ.get("FURIOSA_TEST_CACHE_DIR", str(REPO / ".cache" / "furiosa-llm"))
MODEL = "smollm2-135m-instruct"


def engine_args(**kw):
    from furiosa_llm import AsyncEngineArgs

    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("dtype", "float32")  # greedy parity with HF runs in fp32 whatever --dtype auto picks here
    return AsyncEngineArgs(model=MODEL, cache_dir=CACHE_DIR, devices="cpu", **kw)


@pytest.fixture(scope="session")
def async_engine():
    from furiosa_llm import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(engine_args(seed=0))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def hf_reference(async_engine):
    """Greedy token ids from Hugging Face ``generate`` on the same weights, EOS disabled."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from furiosa_llm.model.loader import _gguf_cache_folder, resolve_model

    folder = _gguf_cache_folder(resolve_model(MODEL), CACHE_DIR)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tok = async_engine.tokenizer

    def generate(prompt: str, n: int) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return out[0, ids.shape[1]:].tolist()

    return generate
