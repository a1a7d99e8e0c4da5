"""InputProcessor: validates a request and turns it into the core's ``Request``.

Checks the request id, the ``SamplingParams`` against the engine's limits (``max_logprobs``,
the vocabulary), the prompt form, and that prompt plus output fit ``max_model_len``; every
failure is a ``ValueError`` naming the argument, the value and what is allowed. Text prompts
are tokenized without special tokens (``inputs.parse_prompt``).
"""

from __future__ import annotations

import time

from furiosa_llm.core import Request

from .inputs import PromptType, parse_prompt
from .outputs import PoolingParams
from .sampling_params import SamplingParams


class PromptTooLongError(ValueError):
    """A prompt plus its output cannot fit the context (``max_model_len``)."""


class InputProcessor:
    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, max_logprobs: int,
                 eos_token_ids: frozenset[int], structured_outputs_backend: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.structured_outputs_backend = structured_outputs_backend
        self._grammars = None  # model.structured_outputs.GrammarBackend, made on the first constrained request
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.eos_token_ids = eos_token_ids

    def process(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None,
                arrival_time: float | None = None) -> tuple[str, SamplingParams, Request]:
        """Returns ``(prompt text, the params, the core request)``; ``ValueError`` on bad input.

        The prompt text is the prompt's own, or for token ids alone their decoded text
        (special tokens kept), so ``RequestOutput.prompt`` is never None (Furiosa-LLM's behaviour).
        """
        if not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r}: must be a str")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r:.80}: expected a SamplingParams")
        params.verify(max_logprobs=self.max_logprobs, vocab_size=self.vocab_size)
        text, ids = parse_prompt(prompt, self.tokenizer, self.vocab_size)
        need = len(ids) + max(params.max_tokens or 1, params.min_tokens, 1)
        if need > self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {len(ids)} prompt tokens + max(max_tokens={params.max_tokens}, min_tokens={params.min_tokens}, 1) "
                f"= {need} exceeds max_model_len={self.max_model_len}"
            )
        structured = self._grammar_state(params) if params.structured_outputs is not None else None
        if text is None:  # token ids alone: RequestOutput.prompt is their text, as in Furiosa-LLM
            text = self.tokenizer.decode(ids)
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            max_tokens=params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids),
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            sampling=params.settings(self.eos_token_ids, structured),
            min_tokens=params.min_tokens,
            stop_token_ids=frozenset(params.stop_token_ids or ()),
            ignore_eos=params.ignore_eos,
        )
        return text, params, req

    def _grammar_state(self, params: SamplingParams):
        """The request's own matcher over its compiled grammar (cached per constraint); ``ValueError`` if it
        does not compile."""
        if self._grammars is None:
            from furiosa_llm.model.structured_outputs import GrammarBackend

            self._grammars = GrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                            self.structured_outputs_backend)
        return self._grammars.new_state(params.structured_outputs)

    def process_pooling(self, request_id: str, prompt: PromptType, params: PoolingParams | None, *, hidden_size: int,
                        pooling_type: str = "MEAN", truncate_prompt_tokens: int | None = None,
                        arrival_time: float | None = None) -> tuple[str | None, PoolingParams, Request]:
        """A pooling request: ``(prompt text, the params, the core request)``; ``ValueError`` on bad input.

        Text is tokenized with the model's special tokens. ``truncate_prompt_tokens`` (the argument,
        else the params') keeps the first tokens for CLS pooling and the last otherwise; -1 means
        ``max_model_len``. Without truncation a prompt longer than ``max_model_len`` is refused.
        """
        if not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r}: must be a str")
        params = params if params is not None else PoolingParams()
        if not isinstance(params, PoolingParams):
            raise ValueError(f"pooling_params={params!r:.80}: expected a PoolingParams")
        params.verify(hidden_size=hidden_size)
        trunc = truncate_prompt_tokens if truncate_prompt_tokens is not None else params.truncate_prompt_tokens
        if truncate_prompt_tokens is not None:
            PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)  # the same validation
        text, ids = parse_prompt(prompt, self.tokenizer, self.vocab_size, add_special_tokens=True)
        if trunc is not None:
            k = self.max_model_len if trunc == -1 else min(trunc, self.max_model_len)
            if k == 0:
                raise ValueError("truncate_prompt_tokens=0: no prompt token would be left")
            if len(ids) > k:
                ids = ids[:k] if pooling_type == "CLS" else ids[-k:]
        if len(ids) > self.max_model_len:
            raise PromptTooLongError(
                f"prompt: {len(ids)} prompt tokens exceed max_model_len={self.max_model_len} "
                "(pass truncate_prompt_tokens to truncate)"
            )
        req = Request(request_id=request_id, prompt_token_ids=ids, max_tokens=1,
                      arrival_time=time.monotonic() if arrival_time is None else arrival_time, pooling=True)
        return text, params, req
