"""OutputProcessor: turns the core's outputs into ``RequestOutput``s.

For each live request it keeps what the API adds to the core's view: the prompt text, the
incremental detokenizer with its stop strings, log-probabilities in vLLM's shape, and what
was already sent (for ``RequestOutputKind.DELTA``). Timing is the core's record
(``CoreOutput.metrics`` on a request's first output). Semantics are vLLM's:

- ``min_tokens``: stop strings are not searched until the request has that many output tokens
  (the sampler already cannot pick EOS or a stop token id before then);
- a request stopped by a token (EOS or one of ``stop_token_ids``) keeps the token id in
  ``token_ids`` but not its text in ``text``, unless ``include_stop_str_in_output``;
- a stop string that ends the text is the finish reason ("stop", ``stop_reason`` the string),
  also when the token that completed it was the last one ``max_tokens`` allowed;
- a request whose step failed ends with finish reason "error" and ``RequestOutput.error``;
- ``CompletionOutput.last_token_truncated``: the final output of a request that a stop string ended
  partway through its last token's text.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from furiosa_llm.core import CoreOutput, RequestMetrics
from furiosa_llm.hal import TokenLogprob

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, Logprob, PoolingOutput, PoolingParams, PoolingRequestOutput, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams


@dataclass
class RequestState:
    """What the API layer keeps for a live request beside the core's ``Request``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class ProcessedOutputs:
    """One step's results: the outputs to deliver, and the requests a stop string ended (to end in the core)."""

    request_outputs: list[RequestOutput | PoolingRequestOutput]
    stopped: list[tuple[str, str]]  # (request id, stop string): still live in the core, to be stopped there
    failed: list[str]  # request ids whose output could not be made: to be aborted in the core


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.pooling: dict[str, tuple[list[int], PoolingParams]] = {}  # live pooling requests

    def add_pooling(self, request_id: str, prompt_token_ids: list[int], params: PoolingParams) -> None:
        self.pooling[request_id] = (prompt_token_ids, params)

    @staticmethod
    def pooled_vector(vec: list[float], params: PoolingParams) -> list[float]:
        """The backend's vector as the params ask: the first ``dimensions`` values, then L2-normalized if ``normalize``."""
        if params.dimensions is not None:
            vec = vec[: params.dimensions]
        if params.normalize:
            scale = 1.0 / max(math.hypot(*vec), 1e-12)
            return [v * scale for v in vec]
        return list(vec)

    def _pooling_output(self, co: CoreOutput) -> PoolingRequestOutput:
        ids, params = self.pooling.pop(co.request_id)
        if co.finish_reason == "error" or co.pooled is None:
            return PoolingRequestOutput(co.request_id, PoolingOutput(None), ids, True,
                                        error=co.error or "the backend returned no pooled vector")
        return PoolingRequestOutput(co.request_id, PoolingOutput(self.pooled_vector(co.pooled, params)), ids, True)

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            metrics: RequestMetrics) -> None:
        want_lp = params.logprobs is not None
        self.states[request_id] = RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, params=params,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                                         stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output),
            metrics=metrics,
            logprobs=[] if want_lp else None,
            cumulative_logprob=0.0 if want_lp else None,
            prompt_logprobs=[] if params.prompt_logprobs is not None else None,
        )

    def abort(self, request_id: str, finish_reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """End a request's stream now (aborted, or failed above the core); None for an unknown id."""
        pooling = self.pooling.pop(request_id, None)
        if pooling is not None:
            return PoolingRequestOutput(request_id, PoolingOutput(None), pooling[0], True, error=error,
                                        aborted=finish_reason == "abort")
        st = self.states.pop(request_id, None)
        if st is None:
            return None
        return self._output(st, finish_reason, None, force=True, error=error)

    def process(self, core_outputs: list[CoreOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs([], [], [])
        for co in core_outputs:
            if co.request_id in self.pooling:
                result.request_outputs.append(self._pooling_output(co))
                continue
            st = self.states.get(co.request_id)
            if st is None:
                continue  # aborted above the core while its batch was in flight
            try:
                out, stop = self._process_one(st, co)
            except Exception as e:  # noqa: BLE001 - one request's failure (a tokenizer error) ends that request only
                out, stop = self.abort(co.request_id, "error", f"{type(e).__name__}: {e}"), None
                if not co.finished:
                    result.failed.append(co.request_id)
            if stop is not None:
                result.stopped.append((co.request_id, stop))
            if out is not None:
                result.request_outputs.append(out)
        return result

    def _process_one(self, st: RequestState, co: CoreOutput) -> tuple[RequestOutput | None, str | None]:
        if co.metrics is not None:  # the request's first output carries the core's timing record
            st.metrics = co.metrics
            st.num_cached_tokens = co.num_cached_tokens or 0
        if co.prompt_logprobs is not None and st.prompt_logprobs is not None:
            if len(st.prompt_logprobs) < len(st.prompt_token_ids):  # not again after a preemption
                st.prompt_logprobs += [self._convert(e) for e in co.prompt_logprobs]
        finish, stop_reason = co.finish_reason, co.stop_reason
        params = st.params
        hit = None
        last = len(co.new_token_ids) - 1
        for i, tok in enumerate(co.new_token_ids):
            st.token_ids.append(tok)
            if co.logprobs is not None and st.logprobs is not None:
                entry = self._convert(co.logprobs)
                st.logprobs.append(entry)
                st.cumulative_logprob += entry[tok].logprob
            stopped_by_token = finish == "stop" and i == last and not isinstance(stop_reason, str)
            if stopped_by_token and not params.include_stop_str_in_output:
                continue  # the stop token's text is not part of the output (vLLM)
            hit = st.detok.add(tok, check_stop=len(st.token_ids) > params.min_tokens)
            if hit is not None:
                break
        new_stop = None
        if hit is not None and finish != "stop":
            # a stop string ends the request, also when max_tokens would have ended it with this token
            new_stop = hit if finish is None else None
            finish, stop_reason = "stop", hit
        if finish is None and not co.new_token_ids:
            return None, new_stop
        if finish is not None:
            self.states.pop(st.request_id, None)
        return self._output(st, finish, stop_reason, error=co.error), new_stop

    def _convert(self, entries: list[TokenLogprob] | None) -> dict[int, Logprob] | None:
        if entries is None:
            return None
        d: dict[int, Logprob] = {}
        for e in entries:
            if e.token_id not in d:
                d[e.token_id] = Logprob(e.logprob, e.rank, self.tokenizer.decode([e.token_id]))
        return d

    def _output(self, st: RequestState, finish_reason: str | None, stop_reason, force: bool = False,
                error: str | None = None) -> RequestOutput | None:
        finished = finish_reason is not None
        kind = st.params.output_kind
        if kind is RequestOutputKind.FINAL and not finished:
            return None
        full_text = st.detok.visible_text(finished)
        text, token_ids, logprobs = full_text, st.token_ids, st.logprobs
        if kind is RequestOutputKind.DELTA:
            text, token_ids = text[st.sent_text :], token_ids[st.sent_tokens :]
            logprobs = None if logprobs is None else logprobs[st.sent_tokens :]
            if not text and not token_ids and not finished and not force:
                return None
        st.sent_text = len(full_text)
        st.sent_tokens = len(st.token_ids)
        comp = CompletionOutput(
            index=0, text=text, token_ids=list(token_ids), cumulative_logprob=st.cumulative_logprob,
            logprobs=None if logprobs is None else list(logprobs), finish_reason=finish_reason, stop_reason=stop_reason,
            last_token_truncated=finished and isinstance(stop_reason, str) and st.detok.cut_last_token,
        )
        return RequestOutput(
            request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
            prompt_logprobs=st.prompt_logprobs, outputs=[comp], finished=finished, metrics=st.metrics,
            num_cached_tokens=st.num_cached_tokens, error=error,
        )
