"""Calibrate a cost profile of the torch backend on the machine at hand.

The real engine serves a sweep of batch shapes: for each (batch size, prompt length), that many
requests arrive at once and decode a fixed number of tokens, which gives prefill chunks of many
sizes and decode steps over a range of batch sizes and context lengths. Each step's device time
(from the execution queue) and host time (the rest of ``LLMEngine.step``) are recorded and
``fit_cost_model`` fits the cost model's parameters. The profile is JSON that ``SimConfig``
(``--profile``) loads, with the model's shape and the engine's KV block count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from furiosa_llm.hal.cost_model import CostModel, ModelShape, StepSample, fit_cost_model

from .real import install_recorder, synthetic_prompt


@dataclass(frozen=True)
class Sweep:
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    prompt_lens: tuple[int, ...] = (32, 128, 384)
    decode_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "prompt_lens"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name}={vals!r}: expected positive ints")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens={self.decode_tokens!r}: must be >= 2")


def measure(engine, sweep: Sweep, progress: bool = False) -> list[StepSample]:
    """Run the sweep on ``engine`` (an ``LLMEngine``) and return every step's shape and times."""
    from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams

    rec = install_recorder(engine)
    rng = np.random.default_rng(sweep.seed)
    params = SamplingParams(temperature=0.0, max_tokens=sweep.decode_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL)
    samples: list[StepSample] = []
    grid = [(b, p) for p in sweep.prompt_lens for b in sweep.batch_sizes]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(grid), desc="calibrating", unit="shape")
    # one warm-up request so lazy initialisation is not measured
    engine.add_request("warmup", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, 16)},
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    rec.completed.clear()
    for i, (b, p) in enumerate(grid):
        for j in range(b):
            engine.add_request(f"cal{i}-{j}", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, p)}, params)
        while engine.has_unfinished_requests():
            start = time.monotonic()
            engine.step()
            samples += rec.take_samples(time.monotonic() - start)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return samples


def calibrate(engine, sweep: Sweep | None = None, *, progress: bool = False) -> tuple[CostModel, ModelShape]:
    """Measure ``engine`` over ``sweep`` and fit a profile; returns it with the model's shape."""
    import torch

    sweep = sweep or Sweep()
    samples = measure(engine, sweep, progress)
    model = ModelShape.from_hf_config(engine.model_config, name=engine.args.model)
    device = str(engine.runner.device)
    cost = fit_cost_model(model, samples, name=f"torch-{device}-{model.name}", dtype_bytes=engine.runner.dtype.itemsize)
    cost.notes.update({
        "num_kv_blocks": engine.num_total_blocks,
        "block_size": engine.args.block_size,
        "device": device,
        "sweep": {"batch_sizes": list(sweep.batch_sizes), "prompt_lens": list(sweep.prompt_lens),
                  "decode_tokens": sweep.decode_tokens},
        "torch_threads": torch.get_num_threads(),
    })
    return cost, model
