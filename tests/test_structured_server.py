"""The server's structured outputs and tools through the unmodified ``openai`` client (in process, ASGI),
and the tool-call parsers on their own."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from conftest import MODEL
from furiosa_llm.entrypoints.openai.tool_parsers import HermesToolParser, Llama3JsonToolParser, get_tool_parser

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}}]
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


def _client(engine, **app_kw):
    from furiosa_llm.entrypoints.openai.api_server import create_app

    app = create_app(engine, served_model_name=MODEL, log_interval_s=0, **app_kw)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)


def _run(engine, fn, **app_kw):
    async def go():
        client = _client(engine, **app_kw)
        try:
            return await fn(client)
        finally:
            await client.close()
    return asyncio.run(go())


def test_json_schema_response_format_chat_and_completions(async_engine):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}

    async def fn(c):
        chat = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=60, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        cmpl = await c.completions.create(model=MODEL, prompt="JSON:", max_tokens=60, temperature=1.0,
                                          extra_body={"response_format": {"type": "json_object"},
                                                      "structured_outputs": None})
        guided = await c.completions.create(model=MODEL, prompt="Answer:", max_tokens=5,
                                            extra_body={"guided_choice": ["yes", "no"]})
        regex = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                                extra_body={"structured_outputs": {"regex": "[0-9]{2}C"}})
        return chat, cmpl, guided, regex

    chat, cmpl, guided, regex = _run(async_engine, fn)
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    assert chat.choices[0].finish_reason == "stop"
    if cmpl.choices[0].finish_reason == "stop":  # json_object may pad with whitespace until max_tokens
        assert isinstance(json.loads(cmpl.choices[0].text), dict)
    assert guided.choices[0].text in ("yes", "no")
    assert regex.choices[0].message.content[:2].isdigit() and regex.choices[0].message.content.endswith("C")


def test_required_tool_choice_streamed_and_not(async_engine):
    named_choice = {"type": "function", "function": {"name": "get_weather"}}

    # sampled (temperature 1) but seeded, so the outcome does not depend on the run: unseeded, "required" (one or more
    # calls) now and then sampled enough calls to end on max_tokens ("length") in a clean-clone CI run
    async def stream(c, **kw):
        return [ch async for ch in await c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS,
                                                                   max_tokens=200, temperature=1.0, stream=True, **kw)]

    async def fn(c):  # the four requests batched together
        return await asyncio.gather(
            c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=200,
                                      temperature=1.0, seed=1),
            stream(c, tool_choice="required", seed=2),
            c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=200, temperature=1.0,
                                      tool_choice=named_choice, seed=3),
            stream(c, tool_choice=named_choice, seed=4))

    full, chunks, named, named_chunks = _run(async_engine, fn)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    for calls, finish in ((_assemble(chunks), "tool_calls"), (_assemble(named_chunks), "stop")):
        assert calls["finish"] == finish and calls["calls"]
        for call in calls["calls"].values():
            assert call["name"] == "get_weather" and call["id"]
            jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "stop" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def _assemble(chunks) -> dict:
    """Tool calls rebuilt from streamed deltas, as a client does (by index, arguments concatenated)."""
    calls: dict[int, dict] = {}
    finish = None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or ():
            slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            if tc.function is not None:
                slot["name"] = tc.function.name or slot["name"]
                slot["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return {"calls": calls, "finish": finish}


def test_bad_schema_is_400_naming_it_and_the_server_keeps_serving(async_engine):
    async def fn(c):
        errors = []
        for kw in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
                   {"extra_body": {"guided_regex": "a(b"}},
                   {"extra_body": {"guided_json": {"type": "object"}, "guided_regex": "a"}},
                   {"tools": TOOLS},  # auto without --enable-auto-tool-choice
                   {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}):
            with pytest.raises(openai.BadRequestError) as e:
                await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, **kw)
            errors.append(e.value.body["message"])
        ok = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5,
                                             extra_body={"guided_choice": ["sunny", "rainy"]})
        return errors, ok

    errors, ok = _run(async_engine, fn)
    assert "objectx" in errors[0] and errors[0].startswith("response_format")
    assert "not closed" in errors[1]
    assert "only one of" in errors[2]
    assert "--enable-auto-tool-choice" in errors[3]
    assert "nope" in errors[4]
    assert ok.choices[0].message.content in ("sunny", "rainy")


def test_auto_tool_choice_parses_hermes_calls(async_engine):
    """auto: whatever the model writes is parsed with the server's parser; a hermes call in a
    (forced) output becomes tool_calls."""
    async def fn(c):
        grammar = ('root ::= "<tool_call>{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\", '
                   '\\"unit\\": \\"celsius\\"}}</tool_call>"')
        async def stream():
            return [ch async for ch in await c.chat.completions.create(
                model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=60, stream=True, temperature=0.0,
                extra_body={"guided_grammar": grammar})]

        return await asyncio.gather(
            c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="auto", temperature=0.0,
                                      max_tokens=60, extra_body={"guided_grammar": grammar}),
            stream(),
            c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=5,
                                      extra_body={"guided_choice": ["hello"]}))

    full, chunks, plain = _run(async_engine, fn, tool_call_parser="hermes", enable_auto_tool_choice=True)
    call = full.choices[0].message.tool_calls[0]
    assert full.choices[0].finish_reason == "tool_calls" and full.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    got = _assemble(chunks)
    assert got["finish"] == "tool_calls" and json.loads(got["calls"][0]["arguments"])["city"] == "Paris"
    assert not any(ch.choices and ch.choices[0].delta.content and "<tool" in ch.choices[0].delta.content for ch in chunks)
    assert plain.choices[0].message.content == "hello" and not plain.choices[0].message.tool_calls


# ---- the parsers on their own --------------------------------------------------------------------
def test_hermes_parser():
    p = HermesToolParser()
    content, calls = p.extract('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
                               '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert p.extract("no calls here") == ("no calls here", [])
    assert p.extract("<tool_call>{bad json</tool_call>")[1] == []
    assert p.may_start_call("Sure <tool") == 5 and p.may_start_call("Sure") is None
    assert p.may_start_call("x <tool_call>{") == 2


def test_llama3_json_parser():
    p = get_tool_parser("llama3_json")
    assert isinstance(p, Llama3JsonToolParser)
    content, calls = p.extract('<|python_tag|>{"name": "f", "parameters": {"a": "b"}}; {"name": "g", "parameters": {}}')
    assert content is None and [c.name for c in calls] == ["f", "g"] and json.loads(calls[0].arguments) == {"a": "b"}
    assert p.extract("Hello there") == ("Hello there", [])
    assert p.extract('{"not": "a call"}')[1] == []
    assert p.may_start_call("  {") == 0 and p.may_start_call("Hi") is None
    with pytest.raises(ValueError, match="tool_call_parser='x'"):
        get_tool_parser("x")
