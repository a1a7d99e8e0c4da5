"""Incremental detokenization and stop strings for one request."""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded in front of the output so leading spaces come out right


def _backend_decode(tokenizer, skip_special_tokens: bool):
    """The Rust ``tokenizers.Tokenizer.decode`` behind a fast tokenizer, when its ``decode`` would return just that.

    Hugging Face's ``decode`` wraps it in input conversion and optional clean-up, ~7x the backend's own
    time (two calls per token per request: at 256 running requests ~2.5 ms of each step's host work on the
    2-core dev VM). Used only for transformers' own fast class with clean-up off, where the wrapper adds
    nothing; None otherwise (slow tokenizers, subclasses that override decoding, clean-up on).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - transformers >= 5 has it
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend) or cls._decode is not TokenizersBackend._decode \
            or cls.decode is not TokenizersBackend.decode:
        return None
    decode = backend.decode
    return lambda ids: decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns output token ids into text a few tokens at a time, without re-decoding the whole output.

    Text is emitted only when the decoded window no longer ends in an incomplete UTF-8
    sequence. Stop strings are matched on the text; while streaming, the last
    ``len(longest stop string) - 1`` characters are held back since they may begin a stop string.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        ctx = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._ids = ctx
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self.text = ""
        self.cut_last_token = False  # a stop string ended the text partway through the last token's text
        self.hold_back = 0 if (not self.stop or self.include_stop) else max(len(s) for s in self.stop) - 1
        self._decode = _backend_decode(tokenizer, skip_special_tokens) or self._hf_decode

    def _hf_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string if the new text completes one (text is cut there).

        With ``check_stop`` False (before ``min_tokens``) stop strings are not searched.
        """
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        before = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._find_stop(before) if check_stop else None

    def _find_stop(self, before: int) -> str | None:
        if not self.stop:
            return None
        for s in self.stop:
            start = max(0, before - len(s) + 1)
            idx = self.text.find(s, start)
            if idx != -1:
                end = idx + len(s) if self.include_stop else idx
                self.cut_last_token = end < len(self.text)  # the last token's text is not all kept
                self.text = self.text[:end]
                return s
        return None

    def visible_text(self, finished: bool) -> str:
        """The text to show: all of it once ``finished`` (with any incomplete UTF-8 tail, see ``_flush``), else
        without the held-back characters that may begin a stop string."""
        if finished:
            self._flush()
            return self.text
        if not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]

    def _flush(self) -> None:
        """At the end, the tokens still held back as an incomplete UTF-8 sequence join the text as the tokenizer
        decodes them (``\ufffd`` where a character is cut), so the final text is the decoded output ids."""
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
