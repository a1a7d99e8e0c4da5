"""Weight formats of the torch backend: ``--dtype auto``, bf16 and ``--quantization w8a16|w4a16``.

Quality is measured, not assumed: the perplexity of the embedded model on a fixed English text
(``tests/data/ppl_english.txt``, public domain: the opening of *Pride and Prejudice*), scored
through the engine's own paged forward pass (``prompt_logprobs``), must stay within 1% of float32's
in bfloat16 and within 3% with W8A16 and W4A16.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import CACHE_DIR, MODEL

TEXT = (Path(__file__).parent / "data" / "ppl_english.txt").read_text()


def _perplexity(**kw) -> float:
    from furiosa_llm import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine(EngineArgs(model=MODEL, cache_dir=CACHE_DIR, devices="cpu", num_kv_blocks=64, seed=0, **kw))
    try:
        engine.add_request("ppl", TEXT, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final = out
        entries = [e for e in final.prompt_logprobs[1:]]
        ids = final.prompt_token_ids[1:]
        nll = [-e[t].logprob for e, t in zip(entries, ids)]
        assert len(nll) > 200
        return math.exp(sum(nll) / len(nll))
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def fp32_ppl() -> float:
    return _perplexity(dtype="float32")


def test_bf16_perplexity_within_1_percent_of_fp32(fp32_ppl):
    ppl = _perplexity(dtype="bfloat16")
    assert abs(ppl / fp32_ppl - 1) < 0.01, (ppl, fp32_ppl)


def test_w8a16_perplexity_within_3_percent_of_fp32(fp32_ppl):
    ppl = _perplexity(quantization="w8a16")
    assert abs(ppl / fp32_ppl - 1) < 0.03, (ppl, fp32_ppl)


def test_w4a16_perplexity_within_3_percent_of_fp32(fp32_ppl):
    ppl = _perplexity(quantization="w4a16")
    assert abs(ppl / fp32_ppl - 1) < 0.03, (ppl, fp32_ppl)


def test_w4a16_keeps_the_gguf_q4_1_weights_exactly():
    """The embedded model's linear layers are GGUF Q4_1 blocks: their minimum and maximum give back each
    block's scale, offset and codes, so the 4-bit weights are the file's, not a second rounding of them."""
    from furiosa_llm.model.loader import load_model_and_tokenizer, resolve_model
    from furiosa_llm.model.weights import Int4Linear

    model, _, _ = load_model_and_tokenizer(resolve_model(MODEL), cache_dir=CACHE_DIR, dtype=torch.float32)
    layer = model.model.layers[3]
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        q = Int4Linear(lin, torch.float32)  # float32 scales: nothing rounded but the codes
        assert torch.equal(q.dequantized(), lin.weight.detach()), lin


def test_gguf_conversion_cache_holds_float32_whatever_dtype_converted_first(tmp_path):
    """The first load of a GGUF converts and caches it; a bf16 first load must not leave bf16-rounded weights
    for later float32 loads (found by the clean-clone CI, where a bf16 test happened to convert first)."""
    from furiosa_llm.model.loader import load_model_and_tokenizer, resolve_model

    src = resolve_model(MODEL)
    first, _, _ = load_model_and_tokenizer(src, cache_dir=str(tmp_path), dtype=torch.bfloat16)
    assert first.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    cached, _, _ = load_model_and_tokenizer(src, cache_dir=str(tmp_path), dtype=torch.float32)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.7.self_attn.q_proj.weight"):
        w = cached.get_parameter(name).detach()
        # Q4_1's d * q + m (fp16 d and m) needs more mantissa than bf16's 8 bits: a bf16 cache would round it
        assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float()), name


def test_int4_linear_matches_dequantized_weights():
    from furiosa_llm.model.weights import INT4_KERNEL_MAX_ROWS, Int4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    q = Int4Linear(lin, torch.bfloat16)
    assert q.codes.shape == (48, 64) and q.codes.dtype == torch.uint8 and q.scale_zero.shape == (48, 4, 2)
    deq = q.dequantized().float()
    # every group of 32 uses the whole 0..15 range: its minimum and maximum are exact but for bf16 scales
    w = lin.weight.detach().view(48, 4, 32)
    assert torch.allclose(deq.view(48, 4, 32).amin(-1), w.amin(-1), atol=0.02)
    assert (deq - lin.weight.detach()).abs().max() < 0.7 * float(q.scale_zero[..., 0].float().max())
    list(_check_kernel_and_dequantized_paths(q, lin, deq, INT4_KERNEL_MAX_ROWS))
    with pytest.raises(ValueError, match="in_features=40"):
        Int4Linear(torch.nn.Linear(40, 48), torch.bfloat16)
    with pytest.raises(ValueError, match="out_features=40"):
        Int4Linear(torch.nn.Linear(64, 40), torch.bfloat16)


def test_int8_linear_matches_dequantized_weights():
    from furiosa_llm.model.weights import INT8_KERNEL_MAX_ROWS, Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin, torch.bfloat16)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (48,)
    # per-channel symmetric: every row uses its full int8 range
    assert int(q.weight_int8.abs().amax(dim=1).min()) == 127
    deq = q.weight_int8.float() * q.scale.float()[:, None]
    for x, y in _check_kernel_and_dequantized_paths(q, lin, deq, INT8_KERNEL_MAX_ROWS):
        # and close to the float weights: int8 rounding is at most half a step per weight
        assert torch.allclose(y, lin(x).detach(), atol=0.1, rtol=0.05)


def test_int8_linear_on_widths_the_int8_kernel_cannot_take():
    """PyTorch's int8 kernel returns NaN (1 row) or crashes the process (2-16 rows) when in_features is not a
    multiple of 16; such a layer takes the converted path (found by a fresh user with intermediate_size=100)."""
    from furiosa_llm.model.weights import Int8Linear

    torch.manual_seed(0)
    for width in (8, 24, 100):
        lin = torch.nn.Linear(width, 32)
        q = Int8Linear(lin, torch.bfloat16)
        deq = q.weight_int8.float() * q.scale.float()[:, None]
        list(_check_kernel_and_dequantized_paths(q, lin, deq, 16))


def test_int8_linear_in_float16_past_the_kernels_rows_does_not_overflow():
    """The converted path (over 16 rows) multiplied unscaled int8 weights (up to 127) in float16 and overflowed
    to inf/NaN for ordinary activations: w8a16 + float16 generated token 0 for any prompt over 16 tokens (found by
    a fresh user)."""
    from furiosa_llm.model.weights import INT8_KERNEL_MAX_ROWS, Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 64, bias=False)
    q = Int8Linear(lin, torch.float16)
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 1, 576) * 64  # a residual stream with large activations, as real models have
    y = q(x.half()).float()
    ref = x.half().float() @ (q.weight_int8.float() * q.scale.float()[:, None]).T
    assert torch.isfinite(y).all()
    assert torch.allclose(y, ref, atol=0.05, rtol=0.02)


def _check_kernel_and_dequantized_paths(q, lin, deq, kernel_max_rows):
    """``q``'s output equals ``x @ deq.T + bias`` (bf16) on the kernel's row counts and past them; yields (x, y)."""
    for rows in (1, kernel_max_rows, kernel_max_rows + 5):
        x = torch.randn(rows, lin.in_features)
        y = q(x.bfloat16()).float()
        ref = x.bfloat16().float() @ deq.T + lin.bias.detach().bfloat16().float()
        assert y.shape == (rows, lin.out_features)
        assert torch.allclose(y, ref, atol=0.05, rtol=0.02)
        yield x, y


def test_auto_dtype_follows_cpu_bf16_support(monkeypatch):
    from furiosa_llm.hal.torch_backend import resolve_dtype
    from furiosa_llm.model import weights

    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32


def test_quantization_argument_errors():
    from furiosa_llm import EngineArgs
    from furiosa_llm.hal.torch_backend import TorchBackend

    with pytest.raises(ValueError, match="quantization='int4'"):
        EngineArgs(model=MODEL, quantization="int4")
    assert EngineArgs(model=MODEL, quantization=None).quantization == "none"  # vLLM's default spelling
    with pytest.raises(ValueError, match="quantization='w8a16' with dtype='float32'"):
        TorchBackend(MODEL, dtype="float32", quantization="w8a16", cache_dir=CACHE_DIR)
    with pytest.raises(ValueError, match="quantization='w4a16' with dtype='float32'"):
        TorchBackend(MODEL, dtype="float32", quantization="w4a16", cache_dir=CACHE_DIR)
    with pytest.raises(ValueError, match="quantization='fp8'"):
        TorchBackend(MODEL, quantization="fp8", cache_dir=CACHE_DIR)


@pytest.mark.parametrize("kind", ["linear", "int8", "int4", "mixed"])
def test_fused_linears_equal_the_separate_layers(kind):
    """q/k/v (and gate/up) run as one matmul over concatenated weights: the same output, column for
    column, and the original modules (now views of the fused weights) still compute the same."""
    from furiosa_llm.model.weights import INT4_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS, Int4Linear, Int8Linear, fuse_linears

    torch.manual_seed(0)
    dtype = torch.float32 if kind == "linear" else torch.bfloat16
    parts = [torch.nn.Linear(64, n, bias=b).to(dtype) for n, b in ((48, True), (16, False), (16, True))]
    if kind == "int8":
        parts = [Int8Linear(p, dtype) for p in parts]
    elif kind == "int4":
        parts = [Int4Linear(p, dtype) for p in parts]
    elif kind == "mixed":  # w4a16 with a layer the int4 kernel cannot take
        parts = [Int4Linear(parts[0], dtype), Int8Linear(parts[1], dtype), Int4Linear(parts[2], dtype)]
    xs = [torch.randn(rows, 64, dtype=dtype) for rows in (1, 3, INT8_KERNEL_MAX_ROWS + 3, INT4_KERNEL_MAX_ROWS + 3)]
    with torch.no_grad():
        before = [torch.cat([p(x) for p in parts], dim=1) for x in xs]
        fused = fuse_linears(parts)
        for x, ref in zip(xs, before):
            assert torch.allclose(fused(x), ref, rtol=1e-5, atol=1e-5 if kind == "linear" else 1e-2)
            after = torch.cat([p(x) for p in parts], dim=1)  # the originals, now views of the fused weights
            if kind == "int4":  # the parts compute through their dequantized weights: equal up to rounding
                assert torch.allclose(after, ref, rtol=1e-2, atol=3e-2)
            else:
                assert torch.equal(after, ref)
    with pytest.raises(ValueError, match="fuse_linears"):
        fuse_linears([torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 1)])


def test_rope_by_roll_equals_hugging_face_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from furiosa_llm.model.runner import _rope, _signed_sin

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = torch.randn(5, 9, 64, dtype=dtype), torch.randn(5, 3, 64, dtype=dtype)
        ang = torch.rand(5, 1, 32) * 10
        cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
        hq, hk = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0], unsqueeze_dim=1)  # [rows, hd] -> [rows, 1, hd]
        sin_s = _signed_sin(sin)
        assert torch.equal(_rope(q, cos, sin_s), hq) and torch.equal(_rope(k, cos, sin_s), hk)
