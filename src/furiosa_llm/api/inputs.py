"""Prompt forms: ``str``, ``{"prompt": str}`` (TextPrompt) or ``{"prompt_token_ids": [...]}`` (TokensPrompt)."""

from __future__ import annotations

from typing import TypedDict, Union


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


PromptType = Union[str, TextPrompt, TokensPrompt]


def parse_prompt(prompt, tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    """Returns ``(prompt text or None, prompt token ids)``; a bad prompt is a ``ValueError``."""
    if isinstance(prompt, str):
        text = prompt
        ids = tokenizer.encode(text)
    elif isinstance(prompt, dict) and set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
        text = prompt["prompt"]
        ids = tokenizer.encode(text)
    elif isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompt_token_ids={ids!r:.80}: expected a list of ints")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        text, ids = None, list(ids)
    else:
        raise ValueError(
            f"prompt={prompt!r:.80}: expected a str, {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}"
        )
    if not ids:
        raise ValueError("prompt: must not be empty")
    return text, list(ids)
