"""Run a workload on the real engine (torch backend, wall clock) and measure what the simulator predicts.

``run_workload`` adds each request when its arrival time comes and steps the engine in
between, exactly as a server would; it returns the same metrics as a simulated run, plus the
shape, device time and host time of every step (what ``calibrate`` fits a profile to).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from furiosa_llm.hal import ExecutionQueue, StepResult
from furiosa_llm.hal.cost_model import BatchShape, StepSample

from .metrics import SLO, MetricsRecorder
from .workload import Workload


class RecordingQueue(ExecutionQueue):
    """Wraps an engine's execution queue and records each batch's shape and device time."""

    def __init__(self, inner: ExecutionQueue) -> None:
        super().__init__(inner.limit)
        self.inner = inner
        self._shapes: collections.deque[BatchShape] = collections.deque()
        self.completed: list[tuple[BatchShape, float, float, float]] = []  # shape, device_s, started, finished

    def submit(self, batch) -> None:
        self.inner.submit(batch)
        self._shapes.append(BatchShape.of(batch))

    def wait(self) -> StepResult:
        result = self.inner.wait()
        shape = self._shapes.popleft()
        self.completed.append((shape, result.finished_at - result.started_at, result.started_at, result.finished_at))
        return result

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight

    def compile(self, bucket, num_units: int) -> None:
        self.inner.compile(bucket, num_units)

    def compiled(self):
        return self.inner.compiled()

    def close(self) -> None:
        self.inner.close()

    def take_samples(self, step_s: float) -> list[StepSample]:
        """The batches completed during one ``LLMEngine.step`` of ``step_s`` seconds, as samples.

        The step's time beyond the device's is host time (scheduling, sampling, detokenizing).
        """
        samples = [StepSample(shape, device_s, max(0.0, step_s - device_s)) for shape, device_s, _s, _f in self.completed]
        self.completed.clear()
        return samples


def install_recorder(engine) -> RecordingQueue:
    """Put a ``RecordingQueue`` around the execution queue of ``engine``'s core (once)."""
    queue = engine.core.queue
    rec = queue if isinstance(queue, RecordingQueue) else RecordingQueue(queue)
    engine.core.queue = rec
    return rec


@dataclass
class RealRun:
    metrics: MetricsRecorder
    duration: float
    samples: list[StepSample] = field(default_factory=list)

    def summary(self, slo: SLO | None = None) -> dict:
        return self.metrics.summary(self.duration, slo)


def synthetic_prompt(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return rng.integers(2, vocab_size, size=n).tolist()


def run_workload(engine, workload: Workload, *, progress: bool = False) -> RealRun:
    """Serve ``workload`` on ``engine`` (an ``LLMEngine``) in wall-clock time; greedy, EOS ignored."""
    from furiosa_llm.api.sampling_params import RequestOutputKind, SamplingParams

    rec = install_recorder(engine)
    arrivals = workload.generate()
    rng = np.random.default_rng(workload.seed + 1)
    prompts = [synthetic_prompt(rng, engine.vocab_size, int(n)) for n in arrivals.input_lens]
    metrics = MetricsRecorder()
    samples: list[StepSample] = []
    n = len(arrivals)
    times = arrivals.arrived_at.tolist()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="req", desc="real engine")
    nxt = 0
    done = 0
    t0 = time.monotonic()
    while done < n:
        now = time.monotonic() - t0
        while nxt < n and times[nxt] <= now:
            rid = f"r{nxt}"
            n_in, n_out = int(arrivals.input_lens[nxt]), int(arrivals.output_lens[nxt])
            params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            try:
                engine.add_request(rid, {"prompt_token_ids": prompts[nxt]}, params, arrival_time=t0 + times[nxt])
                metrics.on_arrival(rid, t0 + times[nxt], n_in, index=nxt)
            except ValueError:  # too long for this engine's context
                metrics.on_reject(t0 + times[nxt])
                done += 1
            nxt += 1
        if not engine.has_unfinished_requests():
            if nxt < n:
                time.sleep(max(0.0, times[nxt] - (time.monotonic() - t0)))
            continue
        start = time.monotonic()
        outs = engine.step()
        end = time.monotonic()
        samples += rec.take_samples(end - start)
        for o in outs:
            c = o.outputs[0]
            metrics.on_tokens(o.request_id, len(c.token_ids), end, o.finished, aborted=c.finish_reason == "abort")
            if o.finished:
                done += 1
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return RealRun(metrics, time.monotonic() - t0, samples)
