"""Structured outputs: grammars compiled by a maintained engine (xgrammar or llguidance), one matcher per request.

``GrammarBackend`` (one per engine) compiles a ``StructuredOutputsParams`` with the chosen
engine — ``xgrammar`` (https://github.com/mlc-ai/xgrammar) or ``guidance`` (llguidance,
https://github.com/guidance-ai/llguidance); ``auto`` takes xgrammar and falls back to
llguidance for what only it supports (Lark grammars, ``whitespace_pattern``, a schema xgrammar
refuses) — caching compiled grammars per distinct constraint (``StructuredOutputsParams.key``).
A constraint that does not compile is a ``ValueError`` naming the field and the engine's message.

``GrammarState`` is one request's matcher; it travels to the backend in
``SamplingSettings.structured`` (so it lives and dies with the request). The sampler calls
``apply_grammar_masks`` on the logits of the rows it samples (each constrained row's allowed
tokens as a packed 32-bit bitmask ``[rows, ceil(vocab / 32)]``, applied to all rows at once by
xgrammar's kernel), then ``accept_tokens`` with the sampled ids. The simulator's synthetic
tokens use ``GrammarState.synthetic_token`` (a token the grammar allows, so the matcher's work is real). A matcher that drifts
from the request (its count of accepted tokens differs from the request's output count, e.g.
after a preemption that recomputes) is rebuilt from the request's output tokens.

When the grammar is complete only the stop (EOS) tokens are allowed, so the request ends with
``finish_reason="stop"``. If ``min_tokens`` masks every token the grammar allows, the grammar
wins (the row keeps its grammar mask only).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from typing import Any

import torch

logger = logging.getLogger("furiosa_llm.structured_outputs")

_CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _engine_message(e: Exception) -> str:
    """The grammar engine's message without its C++ file/line prefix."""
    return _XGR_PREFIX.sub("", str(e).strip()).strip()


def _no_additional_properties(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not set it."""
    if isinstance(schema, dict):
        out = {k: _no_additional_properties(v) for k, v in schema.items()}
        if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_no_additional_properties(v) for v in schema]
    return schema


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _is_lark(grammar: str) -> bool:
    return "::=" not in grammar


class _XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, p) -> Any:
        c, kind = self.compiler, p.kind
        if p.whitespace_pattern is not None:
            raise ValueError("whitespace_pattern needs the guidance backend")
        if kind in ("json", "json_object"):
            schema = p.json if kind == "json" else {"type": "object"}
            if not isinstance(schema, str):
                schema = json.dumps(schema)
            # strict_mode: objects take no properties beyond their schema's unless it allows them
            return c.compile_json_schema(schema, any_whitespace=not p.disable_any_whitespace, strict_mode=True)
        if kind == "regex":
            return c.compile_regex(p.regex)
        if kind == "choice":
            return c.compile_grammar(_choice_ebnf(p.choice))
        if kind == "grammar":
            if _is_lark(p.grammar):
                raise ValueError("a Lark grammar (no '::=') needs the guidance backend; xgrammar reads EBNF (root ::= ...)")
            return c.compile_grammar(p.grammar)
        tag = json.loads(p.structural_tag)
        items = [self.xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return c.compile_structural_tag(items, tag["triggers"])

    def matcher(self, compiled) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    @staticmethod
    def fill(m, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    @staticmethod
    def accept(m, token: int) -> bool:
        return m.accept_token(token)

    @staticmethod
    def terminated(m) -> bool:
        return m.is_terminated()


class _Guidance:
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        eos = stop_token_ids[0] if stop_token_ids else None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)

    def compile(self, p) -> Any:
        M, kind = self.llg.LLMatcher, p.kind
        if kind in ("json", "json_object"):
            schema = p.json if kind == "json" else {"type": "object"}
            if isinstance(schema, str):
                schema = json.loads(schema)
            if p.disable_additional_properties:
                schema = _no_additional_properties(schema)
            defaults: dict[str, Any] = {"whitespace_flexible": not p.disable_any_whitespace}
            if p.whitespace_pattern is not None:
                defaults["whitespace_pattern"] = p.whitespace_pattern
            grammar = M.grammar_from_json_schema(json.dumps(schema), defaults=defaults)
        elif kind == "regex":
            grammar = M.grammar_from_regex(p.regex)
        elif kind == "choice":
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in p.choice))
        elif kind == "grammar":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            text = p.grammar if _is_lark(p.grammar) else gbnf_to_lark(p.grammar)
            grammar = M.grammar_from_lark(text)
        else:
            raise ValueError("structural_tag needs the xgrammar backend")
        err = M.validate_grammar(grammar, self.tokenizer)
        if err:
            raise ValueError(err)
        return grammar

    def matcher(self, compiled) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def fill(self, m, bitmask: torch.Tensor, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(m, bitmask, row)

    @staticmethod
    def accept(m, token: int) -> bool:
        return m.consume_token(token) and not m.is_error()

    @staticmethod
    def terminated(m) -> bool:
        return m.is_stopped()


_ENGINES = {"xgrammar": _XGrammar, "guidance": _Guidance}


class GrammarBackend:
    """Compiles constraints for one model's vocabulary and makes per-request ``GrammarState`` s.

    ``tokenizer``: the Hugging Face tokenizer; ``vocab_size``: the logits' width (the model's
    vocabulary, which may exceed the tokenizer's); ``stop_token_ids``: the model's EOS ids, the
    only tokens allowed once a grammar is complete; ``backend``: ``auto``, ``xgrammar`` or
    ``guidance``. The engines load (and read the vocabulary) on first use.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, backend: str = "auto") -> None:
        if backend != "auto" and backend not in _ENGINES:
            raise ValueError(f"structured_outputs_backend={backend!r}: must be one of auto, {', '.join(_ENGINES)}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.backend = backend
        self._engines: dict[str, Any] = {}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def engine(self, name: str):
        with self._lock:
            if name not in self._engines:
                self._engines[name] = _ENGINES[name](self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self._engines[name]

    def _candidates(self, p) -> list[str]:
        chosen = p.backend if p.backend not in (None, "auto") else None
        if chosen is None and self.backend != "auto":
            chosen = self.backend
        if chosen is not None:
            return [chosen]
        if p.whitespace_pattern is not None or (p.kind == "grammar" and _is_lark(p.grammar)):
            return ["guidance"]
        return ["xgrammar"] if p.kind == "structural_tag" else ["xgrammar", "guidance"]

    def compile(self, p) -> tuple[Any, Any]:
        """``(engine, compiled grammar)`` for ``p``, from the cache when an equal constraint compiled before.

        ``ValueError`` naming the constraint and the engine's message when it does not compile.
        """
        key = (p.backend, p.key())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        errors = []
        for name in self._candidates(p):
            engine = self.engine(name)
            try:
                compiled = engine.compile(p)
                _check_admits_text(engine, compiled, self.vocab_size, self.stop_token_ids)
            except Exception as e:  # the engines raise RuntimeError/ValueError/KeyError for bad constraints
                errors.append(f"{name}: {_engine_message(e)}")
                continue
            with self._lock:
                self._cache[key] = (engine, compiled)
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return engine, compiled
        spec = getattr(p, p.kind)
        raise ValueError(f"structured_outputs: {p.kind}={spec!r:.200} does not compile ({'; '.join(errors)})")

    def new_state(self, p) -> "GrammarState":
        """A fresh matcher for one request (``ValueError`` if ``p`` does not compile)."""
        engine, compiled = self.compile(p)
        return GrammarState(engine, compiled, self.stop_token_ids, self.vocab_size)


def _check_admits_text(engine, compiled, vocab_size: int, stop_token_ids) -> None:
    """``ValueError`` when a compiled constraint allows no token but EOS before any output (e.g. the
    regex ``[^\\x00-\\U0010FFFF]``, which matches nothing): no text could ever satisfy it."""
    m = engine.matcher(compiled)
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    engine.fill(m, bitmask, 0)
    for t in stop_token_ids:
        bitmask[0, t // 32] &= ~_bit(t % 32)
    if not bool(bitmask.any()):
        raise ValueError("the constraint admits no text (no token but EOS can start an output)")


class GrammarState:
    """One request's matcher and the number of its output tokens it has accepted."""

    __slots__ = ("engine", "compiled", "matcher", "num_accepted", "stop_token_ids", "failed", "vocab_size")

    def __init__(self, engine, compiled, stop_token_ids: list[int], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.engine = engine
        self.compiled = compiled
        self.stop_token_ids = stop_token_ids
        self.matcher = engine.matcher(compiled)
        self.num_accepted = 0
        self.failed = False

    def sync(self, num_output_tokens: int, output_token_ids) -> None:
        """Rebuild the matcher from ``output_token_ids`` when it has not accepted exactly those tokens."""
        if self.num_accepted == num_output_tokens or self.failed:
            return
        self.matcher = self.engine.matcher(self.compiled)
        self.num_accepted = 0
        for t in list(output_token_ids)[:num_output_tokens]:
            self.accept(t)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]``: the grammar's, or only EOS once it is complete."""
        if self.failed:  # a matcher that refused a token constrains nothing more (logged)
            bitmask[row] = -1
        elif self.engine.terminated(self.matcher):
            bitmask[row] = 0
            for t in self.stop_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
        else:
            self.engine.fill(self.matcher, bitmask, row)

    def accept(self, token: int) -> None:
        self.num_accepted += 1
        if self.failed or self.engine.terminated(self.matcher):
            return
        if not self.engine.accept(self.matcher, token):
            self.failed = True
            logger.error("structured outputs: the %s matcher refused token %d; the rest of this output is unconstrained",
                         self.engine.name, token)

    def synthetic_token(self, num_output_tokens: int, output_token_ids) -> int:
        """A token the grammar allows next, chosen deterministically, and accepted (the simulator's tokens).

        A stop token only when the grammar allows nothing else. Costs what a sampled row's grammar
        work costs (fill the bitmask, accept), without the logits.
        """
        self.sync(num_output_tokens, output_token_ids)
        bitmask = torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        self.fill(bitmask, 0)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = torch.nonzero(((bitmask[0, :, None] >> shifts) & 1).flatten()[: self.vocab_size]).flatten().tolist()
        stops = set(self.stop_token_ids)
        choices = [t for t in allowed if t not in stops] or allowed or self.stop_token_ids
        token = choices[(self.num_accepted * 2654435761) % len(choices)]
        self.accept(token)
        return token


def _bit(i: int) -> int:
    """Bit ``i`` of a packed int32 bitmask word, as a Python int in int32's range."""
    return -(2**31) if i == 31 else 1 << i


def apply_grammar_masks(scores: torch.Tensor, logits: torch.Tensor, chunks) -> torch.Tensor:
    """``scores`` with every token a constrained row's grammar forbids at -inf.

    ``scores``: ``[len(chunks), vocab]`` float32 after the other masks (``min_tokens``); it is
    changed in place unless it is ``logits`` (then a copy is returned: the logprobs read the
    unmasked logits). ``logits``: the same rows unmasked, used for a row whose ``min_tokens``
    mask leaves none of the grammar's tokens. Rows without ``sampling.structured`` pass
    unchanged. The rows' bitmasks ``[rows, ceil(vocab/32)]`` are filled by the grammar engine (one
    C++ call per row) and applied together by xgrammar's kernel (CPU, CUDA or Triton).
    """
    rows = [i for i, c in enumerate(chunks) if c.sampling.structured is not None]
    if not rows:
        return scores
    import xgrammar as xgr

    vocab = scores.shape[-1]
    # one bitmask row per logits row (xgrammar's kernel reads bitmask[i] for logits[i], i in rows)
    bitmask = torch.full((scores.shape[0], (vocab + 31) // 32), -1, dtype=torch.int32)
    for i in rows:
        c = chunks[i]
        state = c.sampling.structured
        state.sync(c.num_output_tokens, c.output_token_ids)
        state.fill(bitmask, i)
    bitmask = bitmask.to(scores.device)
    out = scores.clone() if scores is logits else scores
    xgr.apply_token_bitmask_inplace(out, bitmask, indices=rows)
    # min_tokens may forbid all the grammar allows (the grammar is complete): the grammar wins
    for i in rows:
        c = chunks[i]
        if c.num_output_tokens < c.sampling.min_tokens and bool(torch.isneginf(out[i]).all()):
            row = logits[i : i + 1].clone()
            xgr.apply_token_bitmask_inplace(row, bitmask[i : i + 1])
            out[i] = row[0]
    return out


def accept_tokens(tokens: list[int], chunks) -> None:
    """Advance each constrained row's matcher with its sampled token."""
    for t, c in zip(tokens, chunks):
        if c.sampling.structured is not None and t >= 0:  # -1: the row's logits were not finite, nothing sampled
            c.sampling.structured.accept(t)

