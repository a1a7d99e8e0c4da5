"""LLM: offline generation (one prompt or a batch), streaming text, and chat, with Furiosa-LLM's signature.

``LLM(model_id_or_path, *, devices=..., scheduler_config=..., served_model_name=..., ...)`` takes
Furiosa-LLM's keywords (2026.4, plus the 2026.2 ones: ``cache_dir``, ``enable_jit_compilation``,
``jit_*``, ``num_blocks_per_pp_stage``) and any ``EngineArgs`` field. Its placeholders
(``max_io_memory_mb``, ``logger_config``, ``trust_remote_code``) are accepted and ignored as
Furiosa-LLM does; ``fxb`` is the RNGD artifact's bundle (a ``ValueError`` on cpu/cuda); a keyword for a
feature this engine does not have (speculative decoding, ``kv_transfer_config``) is a ``ValueError`` when
given a value.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, AsyncGenerator, Sequence

from .async_llm_engine import AsyncLLMEngine, RequestFailedError
from .engine_args import EngineArgs
from .inputs import PromptType
from .llm_engine import LLMEngine
from .native_engine import NativeEngine
from .outputs import (EmbeddingRequestOutput, PoolingParams, PoolingRequestOutput, RequestOutput, ScoringOutput,
                      ScoringRequestOutput)
from .sampling_params import RequestOutputKind, SamplingParams
from .scheduler_config import SchedulerConfig, engine_kwargs_from_scheduler_config

logger = logging.getLogger("furiosa_llm")

STRUCTURED_OUTPUTS_BACKENDS = ("auto", "guidance", "xgrammar")
# Furiosa-LLM's placeholders: accepted, no effect
PLACEHOLDERS = ("max_io_memory_mb", "logger_config", "trust_remote_code")
# Furiosa-LLM features this engine does not have: None (the default) only
UNSUPPORTED = {
    "draft_model_id_or_path": "speculative decoding is not supported",
    "draft_fxb_path": "speculative decoding is not supported",
    "num_speculative_tokens": "speculative decoding is not supported",
    "kv_transfer_config": "KV transfer (disaggregated serving) is not supported",
}
_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineArgs))


class LLM:
    """A model loaded for offline generation, as Furiosa-LLM's ``LLM``.

    Attributes: ``engine`` (the native engine), ``llm_engine`` (an ``LLMEngine`` over it),
    ``tokenizer``, ``max_model_len``, ``model_id_or_path``, ``served_model_name``, ``task_type``.
    Use it as a context manager, or call ``shutdown()``, to free the engine.
    """

    task_type = "generate"

    def __init__(self, model_id_or_path: str | None = None, *, fxb: str | None = None,
                 draft_model_id_or_path: str | None = None, draft_fxb_path: str | None = None,
                 num_speculative_tokens: int | None = None, revision: str | None = None,
                 devices: str | Sequence[str] | None = None, data_parallel_size: int | None = None,
                 pipeline_parallel_size: int | None = None, max_io_memory_mb: int | None = None,
                 max_model_len: int | None = None, scheduler_config: SchedulerConfig | None = None,
                 logger_config: Any = None,
                 structured_outputs_backend: str = "auto", tokenizer: Any = None, tokenizer_mode: str = "auto",
                 seed: int | None = None, served_model_name: str | None = None,
                 kv_transfer_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        model = kwargs.pop("model", None)  # vLLM's name for the first argument
        if model_id_or_path is None:
            model_id_or_path = model
        elif model is not None:
            raise ValueError(f"model_id_or_path={model_id_or_path!r} and model={model!r}: give the model once")
        if model_id_or_path is None:
            raise ValueError("model_id_or_path: required (a model folder, a .gguf file, a cached Hugging Face id "
                             "or 'smollm2-135m-instruct')")
        given = dict(draft_model_id_or_path=draft_model_id_or_path, draft_fxb_path=draft_fxb_path,
                     num_speculative_tokens=num_speculative_tokens, kv_transfer_config=kv_transfer_config)
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"{name}={value!r:.80}: {UNSUPPORTED[name]}; leave it None")
        for name in PLACEHOLDERS:
            kwargs.pop(name, None)
        if kwargs.pop("skip_engine", False):
            raise ValueError("skip_engine=True: not supported; the engine is always built")
        if structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend={structured_outputs_backend!r}: must be one of "
                             f"{', '.join(STRUCTURED_OUTPUTS_BACKENDS)}")
        if served_model_name is not None and not isinstance(served_model_name, str):
            raise ValueError(f"served_model_name={served_model_name!r:.80}: expected a str")
        blocks = kwargs.pop("num_blocks_per_pp_stage", None)  # Furiosa-LLM 2026.2: KV blocks per pipeline stage
        if blocks is not None:
            if isinstance(blocks, (str, bytes)) or len(blocks) != 1 or kwargs.get("num_kv_blocks") is not None:
                raise ValueError(f"num_blocks_per_pp_stage={blocks!r:.80}: expected one number (one pipeline stage), "
                                 "and not together with num_kv_blocks")
            kwargs["num_kv_blocks"] = blocks[0]
        unknown = sorted(set(kwargs) - _ENGINE_FIELDS)
        if unknown:
            raise ValueError(f"LLM(): unknown keyword(s) {', '.join(unknown)}; see furiosa_llm.EngineArgs for the "
                             "engine's options")
        kwargs = engine_kwargs_from_scheduler_config(scheduler_config, kwargs)
        if devices is not None and not isinstance(devices, str):
            devices = ",".join(str(d) for d in devices)
        tokenizer_name = tokenizer if tokenizer is None or isinstance(tokenizer, str) else None
        args = EngineArgs(model=str(model_id_or_path), revision=revision, devices=devices,
                          data_parallel_size=data_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                          max_model_len=max_model_len, tokenizer=tokenizer_name, tokenizer_mode=tokenizer_mode,
                          seed=seed, fxb=None if fxb is None else str(fxb), **kwargs)
        self.model_id_or_path = str(model_id_or_path)
        self.served_model_name = served_model_name or self.model_id_or_path
        self.structured_outputs_backend = structured_outputs_backend
        self.scheduler_config = scheduler_config
        self.engine = NativeEngine(args, tokenizer=None if tokenizer_name == tokenizer else tokenizer)
        self.task_type = self.engine.task  # "generate", or "embed" for an embedding model
        self.llm_engine = LLMEngine(self.engine, self.engine.tokenizer, self.task_type, self.engine.max_model_len,
                                    llm=self)
        self._async_engine: AsyncLLMEngine | None = None
        self._counter = itertools.count()

    @classmethod
    def load_artifact(cls, model_id_or_path: str, **kwargs: Any) -> "LLM":
        """Deprecated in Furiosa-LLM: the same as ``LLM(model_id_or_path, **kwargs)``."""
        return cls(model_id_or_path, **kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the model's ``generation_config.json`` defaults (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens as max_tokens); plain defaults when it sets none.
        ``generate``, ``stream_generate`` and ``chat`` use them when no ``SamplingParams`` is given."""
        return self.engine.get_default_sampling_params()

    # ---- generation ---------------------------------------------------------------------------
    def _prompts(self, prompts, prompt_token_ids, tokenizer_kwargs) -> tuple[list, bool]:
        """The prompts as a list, and whether one prompt (not a list) was given."""
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("prompts and prompt_token_ids: give one of them")
        if prompts is None:
            if prompt_token_ids is None:
                raise ValueError("prompts: required (a str, a prompt dict, or a list of them), or prompt_token_ids")
            single = not prompt_token_ids or not isinstance(prompt_token_ids[0], (list, tuple))
            seqs = [prompt_token_ids] if single else prompt_token_ids
            return [{"prompt_token_ids": list(ids)} for ids in seqs], single
        single = isinstance(prompts, (str, dict))
        if not single and not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts={prompts!r:.80}: expected a str, a prompt dict, or a list of them")
        prompts = [prompts] if single else list(prompts)
        if tokenizer_kwargs is not None:
            if not isinstance(tokenizer_kwargs, dict):
                raise ValueError(f"tokenizer_kwargs={tokenizer_kwargs!r:.80}: expected a dict")
            prompts = [self._tokenize(p, tokenizer_kwargs) for p in prompts]
        return prompts, single

    def _tokenize(self, prompt, tokenizer_kwargs: dict) -> PromptType:
        text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
        if not isinstance(text, str) or (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            return prompt  # token ids already, or a bad prompt (refused when added)
        ids = self.tokenizer(text, **tokenizer_kwargs)["input_ids"]
        return {"prompt_token_ids": list(ids), "prompt": text}

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None,
                 tokenizer_kwargs: dict[str, Any] | None = None, *,
                 use_tqdm: bool = True) -> RequestOutput | list[RequestOutput]:
        """Generate completions; one ``RequestOutput`` for one prompt, a list for a list (Furiosa-LLM).

        ``prompts``: a str, a prompt dict, or a list of them; or ``prompt_token_ids`` (a list of ints,
        or a list of such lists) instead. ``sampling_params``: one for all, or one per prompt; None
        takes ``get_default_sampling_params()``. ``tokenizer_kwargs``: passed to the tokenizer for
        text prompts (e.g. ``{"add_special_tokens": True}``; text is tokenized without them by default).
        A request whose step failed raises ``RequestFailedError``; bad input a ``ValueError``.
        """
        prompts, single = self._prompts(prompts, prompt_token_ids, tokenizer_kwargs)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts; give one or one per prompt")
        outs = self._run(prompts, params, use_tqdm)
        return outs[0] if single else outs

    def _run(self, prompts: list, params: list, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for p, sp in zip(prompts, params):
                rid = f"llm-{next(self._counter)}"
                engine.add_request(rid, p, sp)
                ids.append(rid)
        except ValueError:
            engine.abort_request(ids)
            raise
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        failed = [finals[r] for r in ids if finals[r].outputs[0].finish_reason == "error"]
        if failed:
            raise RequestFailedError(failed[0].request_id, failed[0].error)
        return [finals[r] for r in ids]

    async def stream_generate(self, prompt: PromptType | None = None, sampling_params: SamplingParams | None = None,
                              prompt_token_ids: list[int] | None = None,
                              tokenizer_kwargs: dict[str, Any] | None = None) -> AsyncGenerator[str, None]:
        """Generate for one prompt and yield the new text as it is produced (Furiosa-LLM's streaming API).

        An async generator of str pieces; joined they are the final output's text. Stopping the
        iteration aborts the request and frees its KV blocks. ``sampling_params`` None takes
        ``get_default_sampling_params()``; its ``output_kind`` does not matter here.
        """
        prompts, single = self._prompts(prompt, prompt_token_ids, tokenizer_kwargs)
        if not single:
            raise ValueError("stream_generate: takes one prompt; call it once per prompt")
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r:.80}: expected a SamplingParams")
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        if self._async_engine is None:
            self._async_engine = AsyncLLMEngine.from_llm(self)
        async for out in self._async_engine.generate(prompts[0], params, f"llm-stream-{next(self._counter)}"):
            text = out.outputs[0].text
            if text:
                yield text

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             chat_template: str | None = None, chat_template_content_format: str = "string",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None, *,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them; a list of ``RequestOutput`` either way.

        The model's chat template (or ``chat_template``) renders the messages with the template's
        special tokens; ``tools`` and ``chat_template_kwargs`` go to the template.
        ``continue_final_message`` continues the last (assistant) message instead of starting a new
        one, so it excludes ``add_generation_prompt``. Message content is a str or a list of text
        parts (``chat_template_content_format="string"``, the one format Furiosa-LLM has).
        """
        if not messages:
            raise ValueError("messages: must not be empty")
        if chat_template_content_format != "string":
            raise ValueError(f"chat_template_content_format={chat_template_content_format!r}: must be 'string'")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True needs add_generation_prompt=False: "
                             "a reply either continues the last message or starts a new one")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = []
        for conv in convs:
            conv = [self._message(m) for m in conv]
            if continue_final_message and (not conv or conv[-1]["role"] != "assistant"):
                raise ValueError("continue_final_message=True: the last message must be the assistant's")
            ids = tok.apply_chat_template(conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message, tools=tools, tokenize=True,
                                          **(chat_template_kwargs or {}))
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _message(m: Any) -> dict:
        """A message with its content as a str (text parts joined); ValueError for another form."""
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages: {m!r:.80} is not a dict with a 'role' (and 'content')")
        content = m.get("content")
        if content is None and "tool_calls" not in m:
            raise ValueError(f"messages: {m!r:.80} has no 'content'")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages: content part {part!r:.80}: only text parts are supported "
                                     "(this model is text-only)")
                parts.append(part["text"])
            m = {**m, "content": "\n".join(parts)}
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages: content {content!r:.80}: expected a str or a list of text parts")
        return m

    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *, use_tqdm: bool = False,
               truncate_prompt_tokens: int | None = None, **ignored: Any) -> list[PoolingRequestOutput]:
        """Pool each prompt on an embedding model: one finished ``PoolingRequestOutput`` per prompt, in order.

        ``ValueError`` on a generative model, for a bad prompt or ``PoolingParams``, and for a prompt
        longer than ``max_model_len`` (unless truncation is asked) or the token budget.
        """
        if self.engine.task != "embed":
            raise ValueError(f"encode(): model {self.model_id_or_path!r} is a generative model (task 'generate'); "
                             "pooling needs an embedding model (e.g. all-minilm-l6-v2): use generate()")
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if isinstance(pooling_params, Sequence) and not isinstance(pooling_params, (str, bytes)):
            params = list(pooling_params)
            if len(params) != len(items):
                raise ValueError(f"pooling_params: {len(params)} given for {len(items)} prompts")
        else:
            params = [pooling_params] * len(items)
        engine = self.engine
        items = self._tokenize_texts(items)
        ids: list[str] = []
        try:
            for p, pp in zip(items, params):
                rid = f"llm-{next(self._counter)}"
                engine.add_pooling_request(rid, p, pp, truncate_prompt_tokens=truncate_prompt_tokens)
                ids.append(rid)
        except ValueError:
            engine.abort_request(ids)
            raise
        finals: dict[str, PoolingRequestOutput] = {}
        try:
            while len(finals) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
        except BaseException:
            engine.abort_request(ids)
            raise
        failed = [finals[r] for r in ids if finals[r].error is not None]
        if failed:
            raise RequestFailedError(failed[0].request_id, failed[0].error)
        return [finals[r] for r in ids]

    def _tokenize_texts(self, items: list) -> list:
        """Text prompts tokenized in one batch call of a fast tokenizer (with the model's special tokens, as a
        pooling request is), as ``{"prompt", "prompt_token_ids"}``; other prompts, and every prompt for a slow
        tokenizer, as given."""
        tok = self.tokenizer
        texts = [i for i, p in enumerate(items) if isinstance(p, str)]
        if len(texts) < 2 or not getattr(tok, "is_fast", False):
            return items
        ids = tok([items[i] for i in texts], add_special_tokens=True)["input_ids"]
        out = list(items)
        for i, t in zip(texts, ids):
            out[i] = {"prompt": items[i], "prompt_token_ids": list(t)}
        return out

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *, use_tqdm: bool = False,
              truncate_prompt_tokens: int | None = None, **ignored: Any) -> list[EmbeddingRequestOutput]:
        """Embed each prompt: ``EmbeddingRequestOutput``s whose ``outputs.embedding`` is a list of floats."""
        if pooling_params is not None and isinstance(pooling_params, PoolingParams) and pooling_params.task is None:
            pooling_params = PoolingParams(truncate_prompt_tokens=pooling_params.truncate_prompt_tokens,
                                           dimensions=pooling_params.dimensions, normalize=pooling_params.normalize,
                                           task="embed")
        return [EmbeddingRequestOutput.from_base(o) for o in self.encode(
            prompts, pooling_params, use_tqdm=use_tqdm, truncate_prompt_tokens=truncate_prompt_tokens)]

    def score(self, data_1: PromptType | Sequence[PromptType], data_2: PromptType | Sequence[PromptType], /, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = False,
              pooling_params: PoolingParams | None = None, **ignored: Any) -> list[ScoringRequestOutput]:
        """Score text pairs (vLLM's ``LLM.score``): one ``ScoringRequestOutput`` per pair, ``outputs.score`` a float.

        Pairs: ``data_1`` one text against each of ``data_2`` (1:N), or two lists of one length
        pairwise (N:N). On an embedding model the score is the cosine similarity of the two
        embeddings, in [-1, 1] (vLLM's embedding-similarity scoring); every text is one pooling
        request, all through the engine at once. ``ValueError`` on a generative model, for lists
        of different lengths, an empty list, or a bad prompt.
        """
        from . import score as scoring

        if self.engine.task != "embed":
            raise ValueError(f"score(): model {self.model_id_or_path!r} is a generative model (task 'generate'); "
                             "scoring needs an embedding model (e.g. all-minilm-l6-v2)")
        index = scoring.pairs(data_1, data_2)
        a, b = scoring.as_list(data_1, "text_1"), scoring.as_list(data_2, "text_2")
        embs = self.embed(a + b, pooling_params, truncate_prompt_tokens=truncate_prompt_tokens)
        ea, eb = embs[:len(a)], embs[len(a):]
        return [ScoringRequestOutput(f"{ea[i].request_id}_{eb[j].request_id}",
                                     ScoringOutput(scoring.cosine(ea[i].outputs.embedding, eb[j].outputs.embedding)),
                                     ea[i].prompt_token_ids + eb[j].prompt_token_ids)
                for i, j in index]

    # ---- lifetime ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Abort every live request and free the engine; a second call does nothing."""
        if self._async_engine is not None:
            self._async_engine.shutdown()
        self.llm_engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
