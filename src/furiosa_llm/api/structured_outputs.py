"""``StructuredOutputsParams``: the constraint of a structured-outputs request (vLLM's and Furiosa-LLM's type).

Exactly one constraint is set: ``json`` (a JSON schema, as a dict or a JSON string), ``regex``,
``choice`` (a list of strings), ``grammar`` (an EBNF/GBNF grammar, ``root ::= ...``, or a Lark
grammar, ``start: ...``), ``json_object`` (any JSON object) or ``structural_tag`` (xgrammar's
structural tag, a JSON string). The options refine it: ``disable_any_whitespace`` (no free
whitespace in JSON), ``disable_additional_properties`` (objects take only the properties their
schema lists), ``whitespace_pattern`` (a regex for JSON whitespace; guidance backend), and
``backend`` (``auto``, ``xgrammar`` or ``guidance``; None: the engine's
``structured_outputs_backend``). The grammar engine compiles it when the request is added
(``furiosa_llm.model.structured_outputs``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

BACKENDS = ("auto", "xgrammar", "guidance")
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(kw_only=True)
class StructuredOutputsParams:
    """One output constraint; ``ValueError`` (naming the field) unless exactly one of ``CONSTRAINTS`` is set."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(
                f"structured_outputs: exactly one constraint must be set, of {', '.join(CONSTRAINTS)}; got {what}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json={self.json!r:.80}: not valid JSON ({e})") from None
            else:
                parsed = self.json
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(f"structured_outputs.json={self.json!r:.80}: a JSON schema must be an object (or a bool)")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name}={value!r:.80}: expected a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice={self.choice!r:.80}: expected a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object={self.json_object!r}: expected True (or None)")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name}={getattr(self, name)!r:.80}: expected True or False")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"structured_outputs.backend={self.backend!r}: must be one of {', '.join(BACKENDS)} (or None)")

    @classmethod
    def from_optional(cls, **kwargs: Any) -> "StructuredOutputsParams | None":
        """The params of the keywords that are not None; None when no constraint is given (vLLM's helper).

        An unknown keyword is a ``TypeError``; two constraints are a ``ValueError``.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"StructuredOutputsParams.from_optional() got unexpected keyword arguments: {', '.join(unknown)}")
        kw = {k: v for k, v in kwargs.items() if v is not None}
        if not any(kw.get(name) not in (None, False) for name in CONSTRAINTS):
            return None
        return cls(**kw)

    @property
    def kind(self) -> str:
        """The name of the constraint that is set (one of ``CONSTRAINTS``)."""
        return next(name for name in CONSTRAINTS if getattr(self, name) not in (None, False))

    def key(self) -> tuple:
        """A hashable key of the constraint and its options: equal keys compile to the same grammar."""
        spec = getattr(self, self.kind)
        if self.kind == "json" and not isinstance(spec, str):
            spec = json.dumps(spec, sort_keys=True)
        elif self.kind == "choice":
            spec = tuple(spec)
        return (self.kind, spec, self.disable_any_whitespace, self.disable_additional_properties, self.whitespace_pattern)
