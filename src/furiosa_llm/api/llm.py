"""LLM: offline batch generation over a list of prompts, and chat()."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from .engine_args import EngineArgs
from .inputs import PromptType
from .async_llm_engine import RequestFailedError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model_id_or_path = model
        self.llm_engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts; give one or one per prompt")
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

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        if not messages:
            raise ValueError("messages: must not be empty")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = []
        for conv in convs:
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
                raise ValueError("messages: each message must be a dict with 'role' and 'content'")
            ids = tok.apply_chat_template(conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, **(chat_template_kwargs or {}))
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def encode(self, *args, **kwargs):
        raise ValueError(
            f"encode(): model {self.model_id_or_path!r} is a generative model; pooling is not supported yet"
        )
