"""Held-out steps in one process: does the calibrated fit predict long prompts, and what did the old fit miss?

Calibrates the torch backend (``measure`` over the default ``Sweep``), then, in the same process a
moment later (so the machine's speed is nearly the same), serves held-out shapes twice: four
requests of 200 tokens decoding, a prompt of ``--long`` tokens joining them (a mixed step), then
that prompt alone. Prints JSON: per held-out step, measured device seconds and predicted/measured
for the fit (``fit_cost_model`` on every sweep sample) and for the earlier fit (no joiner, no long
prompts, one FLOP rate for matmuls and attention). Wall-clock: on a shared machine compare the
two fits' ratios, not their distance from 1.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sim_fit_heldout.py [--long 1536]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from furiosa_llm import EngineArgs, LLMEngine  # noqa: E402
from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402
from furiosa_llm.hal.cost_model import CostModel, ModelShape, fit_cost_model  # noqa: E402
from furiosa_llm.sim.calibrate import Sweep, drain, measure  # noqa: E402
from furiosa_llm.sim.real import synthetic_prompt  # noqa: E402


def one_rate_fit(shape: ModelShape, samples) -> CostModel:
    """The earlier fit: attention FLOPs counted with the matmuls', at one rate."""
    class OneRate(ModelShape):
        def matmul_flops(self, b):
            return ModelShape.matmul_flops(self, b) + ModelShape.attention_flops(self, b)

        def attention_flops(self, b):
            return 0.0

    tied = OneRate(**shape.to_dict())
    cost = fit_cost_model(tied, samples, name="one-rate", dtype_bytes=2)
    cost.s_per_attn_flop = None  # attention at the matmul rate
    return cost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "furiosa-llm"))
    p.add_argument("--long", type=int, default=1536, help="Held-out prompt length (tokens).")
    a = p.parse_args()
    load0 = os.getloadavg()
    engine = LLMEngine(EngineArgs(model=a.model, cache_dir=a.cache_dir, devices="cpu", num_kv_blocks=1024, seed=0))
    shape = ModelShape.from_hf_config(engine.model_config, name=a.model)
    sweep = Sweep()
    cal = measure(engine, sweep)
    rec = engine.core.queue  # measure installed the recorder
    rng = np.random.default_rng(5)
    held = []

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.FINAL)

    for rep in range(2):
        for j in range(4):
            engine.add_request(f"h{rep}-{j}", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, 200)}, params(8))
        held += drain(engine, rec, 3, (f"h{rep}-join", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, a.long)},
                                       params(2)))
        engine.add_request(f"h{rep}-alone", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, a.long)}, params(2))
        held += drain(engine, rec)
    engine.shutdown()
    fit = fit_cost_model(shape, cal, name="fit", dtype_bytes=2)
    ctx_max = max(sweep.prompt_lens) + sweep.decode_tokens  # the grid's longest context: no long prompts
    earlier = [s for s in cal if s.shape.kind != "mixed" and s.shape.kv_tokens <= ctx_max * s.shape.num_seqs]
    old = one_rate_fit(shape, earlier)
    steps = [{"kind": s.shape.kind, "tokens": s.shape.num_tokens, "seqs": s.shape.num_seqs, "device_ms": s.device_s * 1e3,
              "fit_pred_over_meas": fit.device_time(shape, s.shape) / s.device_s,
              "one_rate_pred_over_meas": old.device_time(shape, s.shape) / s.device_s} for s in held]
    print(json.dumps({"benchmark": "sim_fit_heldout", "long_prompt": a.long, "os_loadavg": [load0, os.getloadavg()],
                      "attention_over_matmul_s_per_flop": fit.attn_rate / fit.s_per_flop, "fit_notes": fit.notes,
                      "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
