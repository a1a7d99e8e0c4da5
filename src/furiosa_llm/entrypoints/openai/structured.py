"""The server's structured outputs and tools: request fields -> ``StructuredOutputsParams``, tool choice.

Sources of a constraint (at most one per request, else a 400 naming both):
- ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``, ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}}}`` (OpenAI), ``{"type": "structural_tag", ...}`` (vLLM);
- ``structured_outputs``: an object with ``StructuredOutputsParams``'s fields (vLLM);
- ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (+ ``guided_decoding_backend``,
  ``guided_whitespace_pattern``): vLLM's older fields;
- ``tools`` with ``tool_choice="required"`` (a JSON array of one or more calls, each a tool's name and
  arguments valid for its schema) or a named function (its arguments' schema), as vLLM does, in
  compact JSON (``disable_any_whitespace``).

Every failure is a ``ValueError`` whose message starts with the field it names.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from furiosa_llm.api.structured_outputs import StructuredOutputsParams

from .tool_parsers import ToolCall

_SO_FIELDS = {f.name for f in fields(StructuredOutputsParams)}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _make(field_name: str, **kw) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        raise ValueError(f"{field_name}: {e}") from None


def _from_response_format(rf: dict) -> StructuredOutputsParams | None:
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _make("response_format", json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError('response_format: type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return _make("response_format", json=spec["schema"])
    if kind == "structural_tag":
        return _make("response_format", structural_tag=json.dumps(rf))
    raise ValueError(f"response_format={rf!r:.100}: type must be text, json_object, json_schema or structural_tag")


def _from_structured_outputs(so: Any) -> StructuredOutputsParams:
    if not isinstance(so, dict):
        raise ValueError(f"structured_outputs={so!r:.100}: expected an object with the fields of StructuredOutputsParams")
    unknown = sorted(set(so) - _SO_FIELDS)
    if unknown:
        raise ValueError(f"structured_outputs: unknown fields {unknown}; allowed: {sorted(_SO_FIELDS)}")
    return _make("structured_outputs", **{k: v for k, v in so.items() if v is not None})


def _from_guided(req) -> tuple[str, StructuredOutputsParams] | None:
    given = [name for name in _GUIDED if getattr(req, name, None) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"{given[1]}: only one of {', '.join(_GUIDED)} may be set; got {', '.join(given)}")
    backend = getattr(req, "guided_decoding_backend", None)
    if backend is not None and backend not in ("auto", "xgrammar", "guidance"):
        raise ValueError(f"guided_decoding_backend={backend!r}: must be auto, xgrammar or guidance")
    kw = {_GUIDED[given[0]]: getattr(req, given[0]), "backend": backend,
          "whitespace_pattern": getattr(req, "guided_whitespace_pattern", None)}
    return given[0], _make(given[0], **{k: v for k, v in kw.items() if v is not None})


def _tools_schema(tools: list[dict]) -> dict:
    """vLLM's schema for ``tool_choice="required"``: a non-empty array of ``{"name", "parameters"}`` calls."""
    one_of = []
    for t in tools:
        f = t["function"]
        one_of.append({"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                        "parameters": f.get("parameters") or {"type": "object"}},
                       "required": ["name", "parameters"]})
    return {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}


def check_tools(tools: list[dict] | None) -> list[dict]:
    """``tools`` validated: each ``{"type": "function", "function": {"name": str, "parameters": {...}}}``."""
    out = []
    for i, t in enumerate(tools or ()):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f'tools[{i}]: expected {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        if "parameters" in f and not isinstance(f["parameters"], dict):
            raise ValueError(f"tools[{i}].function.parameters: expected a JSON schema object")
        out.append(t)
    return out


def tool_mode(req, auto_enabled: bool) -> tuple[str, dict | None]:
    """``(mode, named tool)``: mode is none, auto, required or named (vLLM's rules).

    Without ``tools`` the mode is none. ``tool_choice`` left out with tools is auto, which needs
    the server's ``--enable-auto-tool-choice`` and ``--tool-call-parser``.
    """
    tools = check_tools(getattr(req, "tools", None))
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise ValueError(f"tool_choice={choice!r:.80}: needs tools")
        return "none", None
    if choice is None:
        choice = "auto"
    if choice == "none":
        return "none", None
    if choice == "required":
        return "required", None
    if choice == "auto":
        if not auto_enabled:
            raise ValueError('tool_choice="auto": needs the server started with --enable-auto-tool-choice and '
                             '--tool-call-parser (or use tool_choice="required" or a named function)')
        return "auto", None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        for t in tools:
            if t["function"]["name"] == name:
                return "named", t
        raise ValueError(f"tool_choice={choice!r:.100}: names no function of tools "
                         f"({', '.join(t['function']['name'] for t in tools)})")
    raise ValueError(f"tool_choice={choice!r:.80}: must be none, auto, required or "
                     '{"type": "function", "function": {"name": ...}}')


def structured_outputs_of(req, mode: str = "none", named: dict | None = None) -> tuple[str | None, StructuredOutputsParams | None]:
    """``(the request field it came from, the constraint)`` of a completion or chat request; (None, None) without one."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        p = _from_response_format(rf)
        if p is not None:
            found.append(("response_format", p))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        found.append(("structured_outputs", _from_structured_outputs(so)))
    guided = _from_guided(req)
    if guided is not None:
        found.append(guided)
    # tool arguments are compact JSON (no free whitespace, which a sampled model may pad up to max_tokens)
    if mode == "required":
        found.append(("tools", _make("tools", json=_tools_schema(req.tools), disable_any_whitespace=True)))
    elif mode == "named":
        schema = named["function"].get("parameters") or {"type": "object"}
        found.append(("tool_choice", _make("tool_choice", json=schema, disable_any_whitespace=True)))
    if len(found) > 1:
        raise ValueError(f"{found[1][0]}: only one output constraint per request; got {found[0][0]} and {found[1][0]}")
    return found[0] if found else (None, None)


def required_calls(text: str) -> list[ToolCall]:
    """The calls of a ``tool_choice="required"`` output (a JSON array of ``{"name", "parameters"}``)."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for c in items if isinstance(c, dict) and isinstance(c.get("name"), str)]
