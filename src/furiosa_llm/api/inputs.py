"""Prompt forms: ``str``, a ``TextPrompt`` dict or a ``TokensPrompt`` dict (vLLM's and Furiosa-LLM's).

A ``TextPrompt`` is ``{"prompt": str}``, a ``TokensPrompt`` ``{"prompt_token_ids": [int, ...]}`` that
may also carry the ``"prompt"`` text it came from. Both may carry ``multi_modal_data``,
``mm_processor_kwargs`` and ``cache_salt``: accepted and ignored, as the models served here are
text-only (multimodal data itself is a ``ValueError``). Text is tokenized without special tokens,
as Furiosa-LLM does: callers apply the chat template (``LLM.chat`` does).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, Union


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any] | None]
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any] | None]
    cache_salt: NotRequired[str]


PromptType = Union[str, TextPrompt, TokensPrompt]

_IGNORED_KEYS = ("multi_modal_data", "mm_processor_kwargs", "cache_salt")
_KEYS = frozenset({"prompt", "prompt_token_ids", *_IGNORED_KEYS})
_FORMS = "a str, {'prompt': str} or {'prompt_token_ids': [int, ...]}"


def _check_ignored_keys(prompt: dict) -> None:
    """``multi_modal_data``, ``mm_processor_kwargs``, ``cache_salt``: checked for type, then ignored."""
    mm = prompt.get("multi_modal_data")
    if mm is not None and (not isinstance(mm, dict) or mm):
        kinds = ", ".join(sorted(map(str, mm))) if isinstance(mm, dict) else type(mm).__name__
        raise ValueError(
            f"multi_modal_data ({kinds}): this model is text-only and takes no images, audio or video; "
            "send text or token ids only"
        )
    kw = prompt.get("mm_processor_kwargs")
    if kw is not None and not isinstance(kw, dict):
        raise ValueError(f"mm_processor_kwargs={kw!r:.80}: expected a dict or None")
    salt = prompt.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ValueError(f"cache_salt={salt!r:.80}: expected a str")


def parse_prompt(prompt, tokenizer, vocab_size: int, add_special_tokens: bool = False) -> tuple[str | None, list[int]]:
    """Returns ``(prompt text or None, prompt token ids)``; a bad prompt is a ``ValueError``.

    The text is the prompt's own (a ``str``, a ``TextPrompt``, or a ``TokensPrompt`` that carries
    ``"prompt"``); None for token ids alone. Text is tokenized with ``add_special_tokens`` (False for
    generation; True for an encoder model's pooling requests, which need its [CLS]/[SEP]).
    """
    if isinstance(prompt, str):
        text = prompt
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    elif isinstance(prompt, dict):
        unknown = sorted(map(str, set(prompt) - _KEYS))
        if unknown:
            raise ValueError(
                f"prompt: unknown key(s) {', '.join(map(repr, unknown))}; a prompt is {_FORMS}, optionally with "
                f"{', '.join(sorted(_KEYS - {'prompt', 'prompt_token_ids'}))}"
            )
        _check_ignored_keys(prompt)
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prompt={text!r:.80}: expected a str")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"prompt_token_ids={ids!r:.80}: expected a list of ints")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        elif text is not None:
            ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        else:
            raise ValueError(f"prompt={prompt!r:.80}: expected {_FORMS}")
    else:
        raise ValueError(f"prompt={prompt!r:.80}: expected {_FORMS}")
    if not ids:
        raise ValueError("prompt: must not be empty")
    return text, list(ids)
