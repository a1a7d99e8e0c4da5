"""Tool-call parsers for ``tool_choice="auto"`` (``--tool-call-parser``), with vLLM's names and formats.

- ``hermes`` (Hermes 2 Pro, Qwen 2.5/3): each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  text before the first call is the message content.
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calling): the output is one JSON object
  ``{"name": ..., "parameters": {...}}`` (or several separated by ``;``), optionally after
  ``<|python_tag|>``.

``extract(text)`` gives ``(content, calls)``; a call is ``ToolCall(name, arguments)`` where
``arguments`` is a JSON string. Text that only looks like a call (bad JSON, no name) stays content.
Streaming: ``may_start_call(text)`` tells the server when to stop streaming content and hold the
rest until the output ends (then ``extract`` runs on the whole text).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _call_of(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesToolParser:
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.START not in text:
            return text, []
        calls = []
        for body in self._CALL.findall(text):
            try:
                call = _call_of(json.loads(body), "arguments")
            except ValueError:
                call = None
            if call is None:
                return text, []  # not a well-formed call: the whole output is content
            calls.append(call)
        content = text[: text.index(self.START)].strip()
        return content or None, calls

    def may_start_call(self, text: str) -> int | None:
        """The offset from which ``text`` may be a call (hold it back while streaming); None if none."""
        i = text.find(self.START)
        if i >= 0:
            return i
        for k in range(len(self.START) - 1, 0, -1):  # a partial "<tool_call>" at the end
            if text.endswith(self.START[:k]):
                return len(text) - k
        return None


class Llama3JsonToolParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].strip()
        if not body.startswith("{"):
            return text, []
        calls, dec, i = [], json.JSONDecoder(), 0
        while i < len(body):
            try:
                obj, end = dec.raw_decode(body, i)
            except ValueError:
                return text, []
            call = _call_of(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return None, calls

    def may_start_call(self, text: str) -> int | None:
        stripped = text.lstrip()
        if not stripped or stripped.startswith("{") or self.TAG.startswith(stripped[: len(self.TAG)]):
            return 0
        return None


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str):
    """A parser by its ``--tool-call-parser`` name; ``ValueError`` naming the ones there are."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser={name!r}: must be one of {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()
