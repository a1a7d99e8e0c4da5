"""Calibrate a cost profile of the torch backend on the machine at hand.

The real engine serves a sweep of batch shapes: for each (batch size, prompt length), that many
requests arrive at once and decode a fixed number of tokens, which gives prefill chunks of many
sizes and decode steps over a range of batch sizes and context lengths. Midway through each
shape's decode one more request arrives, so its prefill shares a step with the running decodes
(a mixed step, as under Poisson arrivals), and a few long prompts run alone (their attention,
quadratic in the prompt, sets the cost model's attention rate). Each step's device time
(from the execution queue) and host time (the rest of ``LLMEngine.step``) are recorded and
``fit_cost_model`` fits the cost model's parameters. The profile is JSON that ``SimConfig``
(``--profile``) loads, with the model's shape and the engine's KV block count.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from furiosa_llm.hal.cost_model import BatchShape, CostModel, ModelShape, StepSample, fit_cost_model

from .real import install_recorder, synthetic_prompt

logger = logging.getLogger("furiosa_llm.sim")


@dataclass(frozen=True)
class Sweep:
    """The shapes a calibration measures.

    Every (batch size, prompt length) of ``batch_sizes`` x ``prompt_lens``: that many requests
    arrive together and decode ``decode_tokens`` tokens each; with ``join`` (torch backend only:
    the vendor engine's steps are read off its token stream, which needs requests that arrive
    together) one more request of the same prompt length arrives midway through their decode and
    its prefill shares a step with them. Then each of ``long_prompt_lens`` alone (batch 1), when
    it fits the engine's ``max_model_len``. With ``ragged`` (torch backend only, as ``join``), for
    each batch size of two or more, that many requests whose prompt lengths spread evenly over
    ``prompt_lens``' range arrive together and decode side by side: decode steps of unequal
    contexts, which pin the cost of padding decode rows to the longest.
    """

    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    prompt_lens: tuple[int, ...] = (32, 128, 384)
    decode_tokens: int = 16
    seed: int = 0
    long_prompt_lens: tuple[int, ...] = (512, 1024, 1536, 2048)
    join: bool = True
    ragged: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "prompt_lens", "long_prompt_lens"):
            vals = getattr(self, name)
            if (not vals and name != "long_prompt_lens") or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name}={vals!r}: expected positive ints")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens={self.decode_tokens!r}: must be >= 2")

    def fits(self, prompt_len: int, max_model_len: int | None) -> bool:
        """Whether a prompt of ``prompt_len`` and its ``decode_tokens`` fit ``max_model_len`` (None: no limit)."""
        return max_model_len is None or prompt_len + self.decode_tokens <= max_model_len

    def long_prompts(self, max_model_len: int | None = None) -> list[int]:
        """The long prompts measured alone: those of ``long_prompt_lens`` that fit and are not a batch-1 grid shape."""
        return [p for p in self.long_prompt_lens
                if self.fits(p, max_model_len) and not (p in self.prompt_lens and 1 in self.batch_sizes)]

    def shapes(self, max_model_len: int | None = None) -> list[tuple[int, int]]:
        """(batch size, prompt length) in the order measured: the grid, then ``long_prompts`` at batch 1.

        Raises ``ValueError`` when a prompt of ``prompt_lens`` (which every shape needs) does not fit.
        """
        too_long = [p for p in self.prompt_lens if not self.fits(p, max_model_len)]
        if too_long:
            raise ValueError(f"prompt_lens={list(self.prompt_lens)}: {too_long} + decode_tokens={self.decode_tokens} "
                             f"exceed the engine's max_model_len={max_model_len}; use shorter prompt lengths")
        grid = [(b, p) for p in self.prompt_lens for b in self.batch_sizes]
        return grid + [(1, p) for p in self.long_prompts(max_model_len)]

    def join_step(self, num_prefill_steps: int) -> int:
        """The step (0-based) before which a shape's joining request is added: midway through the others'
        ``decode_tokens - 1`` decode steps, so that at least one decode step remains to share with it."""
        return num_prefill_steps + (self.decode_tokens - 1) // 2

    def ragged_prompt_lens(self) -> list[list[int]]:
        """The prompt lengths of each ragged group (empty without ``ragged``): b lengths spread over ``prompt_lens``."""
        lo, hi = min(self.prompt_lens), max(self.prompt_lens)
        if not self.ragged or lo == hi:
            return []
        return [[lo + (hi - lo) * j // (b - 1) for j in range(b)] for b in self.batch_sizes if b >= 2]

    def describe(self, max_model_len: int | None = None) -> dict:
        """The sweep as measured: ``long_prompt_lens`` lists only the long prompts that fit ``max_model_len``."""
        return {"batch_sizes": list(self.batch_sizes), "prompt_lens": list(self.prompt_lens),
                "decode_tokens": self.decode_tokens, "long_prompt_lens": self.long_prompts(max_model_len),
                "join": self.join, "ragged": self.ragged}


def _grid(engine, sweep: Sweep) -> list[tuple[int, int]]:
    """``sweep.shapes`` for ``engine``'s ``max_model_len``, logging the long prompts left out for not fitting."""
    max_model_len = getattr(engine, "max_model_len", None)
    left_out = [p for p in sweep.long_prompt_lens if not sweep.fits(p, max_model_len)]
    if left_out:
        logger.warning("calibrate: long prompts %s do not fit max_model_len=%s and are left out; the attention "
                       "rate rests on the shorter prompts", left_out, max_model_len)
    return sweep.shapes(max_model_len)


def measure(engine, sweep: Sweep, progress: bool = False) -> list[StepSample]:
    """Run the sweep on ``engine`` (an ``LLMEngine``) and return every step's shape and times."""
    from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams

    rec = install_recorder(engine)
    rng = np.random.default_rng(sweep.seed)
    params = SamplingParams(temperature=0.0, max_tokens=sweep.decode_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL)
    samples: list[StepSample] = []
    grid = _grid(engine, sweep)
    long_start = len(sweep.prompt_lens) * len(sweep.batch_sizes)
    budget = engine.args.max_num_batched_tokens
    join_params = SamplingParams(temperature=0.0, max_tokens=max(2, sweep.decode_tokens // 2), ignore_eos=True,
                                 output_kind=RequestOutputKind.FINAL)
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
        # the joiner arrives after the prefill chunks and half the decode steps of the others
        join_at = sweep.join_step(-(-b * p // budget)) if sweep.join and i < long_start else -1
        joiner = ((f"cal{i}-join", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, p)}, join_params)
                  if join_at >= 0 else ())
        samples += drain(engine, rec, join_at, joiner)
        if bar is not None:
            bar.update(1)
    for i, lens in enumerate(sweep.ragged_prompt_lens()):
        for j, p in enumerate(lens):
            engine.add_request(f"cal-ragged{i}-{j}", {"prompt_token_ids": synthetic_prompt(rng, engine.vocab_size, p)},
                               params)
        samples += drain(engine, rec)
    if bar is not None:
        bar.close()
    return samples


def drain(engine, rec, join_at: int = -1, joiner: tuple = ()) -> list[StepSample]:
    """Step ``engine`` (an ``LLMEngine`` whose queue is the recorder ``rec``) until it is idle; every step's sample.

    ``joiner``: ``add_request``'s arguments for a request added just before step ``join_at`` (0-based).
    """
    samples: list[StepSample] = []
    n = 0
    while engine.has_unfinished_requests():
        if n == join_at:
            engine.add_request(*joiner)
        start = time.monotonic()
        engine.step()
        n += 1
        samples += rec.take_samples(time.monotonic() - start)
    return samples


def calibrate(engine, sweep: Sweep | None = None, *, progress: bool = False) -> tuple[CostModel, ModelShape]:
    """Measure ``engine`` over ``sweep`` and fit a profile; returns it with the model's shape.

    An engine on RNGD (``RngdEngine``) is measured through the vendor engine's stream (``calibrate_rngd``).
    """
    if hasattr(engine.native_engine, "artifact"):
        return calibrate_rngd(engine, sweep, progress=progress)
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
        "sweep": sweep.describe(getattr(engine, "max_model_len", None)),
        "dtype": str(engine.runner.dtype).replace("torch.", ""),
        "quantization": engine.args.quantization,
        "torch_threads": torch.get_num_threads(),
    })
    return cost, model


# ---- RNGD: the vendor engine, measured through its token stream -----------------------------------
#
# The vendor engine exposes no step API, so a step's time is read off the stream: for a sweep
# shape (b requests of p prompt tokens arriving together), the prefill of all b prompts ends when the
# last of them has its first token, and decode step k ends when every request has its (k+1)-th
# token. That gives one prefill sample (b*p tokens) and decode_tokens-1 decode samples (b sequences
# at context p+k) per shape, which ``fit_cost_model`` fits as for the torch backend. Host time is not
# separable from the stream (the vendor's host work is inside each gap), so it is recorded as 0 and
# the device terms absorb it.

def _prefill_shape(b: int, p: int) -> BatchShape:
    return BatchShape(num_tokens=b * p, num_seqs=b, num_sampled=b, attended=b * p * (p + 1) // 2, kv_read_tokens=b * p,
                      num_decode_seqs=0)


def _decode_shape(b: int, start: int) -> BatchShape:
    return BatchShape(num_tokens=b, num_seqs=b, num_sampled=b, attended=b * (start + 1), kv_read_tokens=b * (start + 1),
                      num_decode_seqs=b, decode_max_context=start + 1)


def stream_samples(log: list[tuple[str, int, float]], t0: float, b: int, p: int) -> list[StepSample]:
    """Samples of one sweep shape from its token log ``(request id, new tokens, arrival s)``; ``t0``: submit time."""
    times: dict[str, list[float]] = {}
    for rid, n, at in log:
        times.setdefault(rid, []).extend([at] * n)
    if len(times) != b:
        raise ValueError(f"calibration: {len(times)} of {b} requests produced tokens")
    n_tok = min(len(t) for t in times.values())
    ends = [max(t[k] for t in times.values()) for k in range(n_tok)]
    samples = [StepSample(_prefill_shape(b, p), max(ends[0] - t0, 1e-6), 0.0)]
    for k in range(1, n_tok):
        samples.append(StepSample(_decode_shape(b, p + k - 1), max(ends[k] - ends[k - 1], 1e-6), 0.0))
    return samples


def measure_rngd(engine, sweep: Sweep, progress: bool = False) -> list[StepSample]:
    """Run ``sweep`` on an ``LLMEngine`` over ``RngdEngine`` and return the samples read off the stream."""
    from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams

    native = engine.native_engine
    rng = np.random.default_rng(sweep.seed)
    params = SamplingParams(temperature=0.0, max_tokens=sweep.decode_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL)
    engine.add_request("warmup", {"prompt_token_ids": synthetic_prompt(rng, native.vocab_size, 16)},
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    samples: list[StepSample] = []
    grid = _grid(engine, sweep)  # no joiner: the stream needs requests that arrive together
    try:
        for i, (b, p) in enumerate(grid):
            native.token_log = log = []
            t0 = time.monotonic()
            for j in range(b):
                engine.add_request(f"cal{i}-{j}", {"prompt_token_ids": synthetic_prompt(rng, native.vocab_size, p)}, params)
            while engine.has_unfinished_requests():
                engine.step()
            samples += stream_samples(log, t0, b, p)
            if progress:
                print(f"calibrating: shape {i + 1}/{len(grid)} (batch {b}, prompt {p})", flush=True)
    finally:
        native.token_log = None
    return samples


def calibrate_rngd(engine, sweep: Sweep | None = None, *, progress: bool = False) -> tuple[CostModel, ModelShape]:
    """Measure the vendor engine on a card over ``sweep`` and fit the simulator's RNGD cost model.

    bf16 weights and KV (2 bytes), as RNGD artifacts are compiled; the profile's notes name the devices,
    the FXB and the native version.
    """
    from furiosa_llm.hal.rngd_knobs import NATIVE_VERSION

    sweep = sweep or Sweep()
    native = engine.native_engine
    samples = measure_rngd(engine, sweep, progress)
    model = ModelShape.from_hf_config(native.model_config, name=native.artifact.model_dir.name)
    devices = native.native_config.ctor["devices"]
    cost = fit_cost_model(model, samples, name=f"rngd-{devices}-{model.name}", dtype_bytes=2)
    cost.notes.update({
        "devices": devices, "fxb": native.artifact.fxb_path.name, "furiosa_llm_native": NATIVE_VERSION,
        "source": "vendor engine token-stream timing (prefill: submit to last first token; decode: per-token gaps)",
        "sweep": {**sweep.describe(getattr(engine, "max_model_len", None)), "join": False, "ragged": False},
    })
    return cost, model
