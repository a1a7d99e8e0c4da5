"""``furiosa-llm serve``: the OpenAI-compatible server on uvicorn, with Furiosa-LLM's command line.

``furiosa-llm serve MODEL [options]`` (``--model MODEL`` is still accepted). Every option of
Furiosa-LLM's ``serve`` is recognised: those with a meaning on this engine are honoured (the
engine flags of ``EngineArgs``, ``-tp/-pp/-dp``, ``--allowed-origins``, ``--response-role``,
``--max-concurrency``, ``--tool-call-parser``, ...); the others (``IGNORED``: buckets, reasoning parsers,
speculative decoding, multimodal inputs, ...) are accepted, and each one given is named in a
warning at start. Booleans are bare switches with ``--no-`` forms (``true``/``false`` values
still work).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("furiosa_llm.server")

_REASONING = "reasoning parsers are not implemented by this engine"
_BUCKETS = "this engine runs every batch shape; there are no compiled buckets to choose"
_SCHED = "the scheduler here has one policy (see --max-processing-samples, --spare-blocks-ratio, --npu-queue-limit)"
_SPEC = "speculative decoding is not implemented by this engine"
_MM = "multimodal inputs are not implemented by this engine (text-only models)"
_RESP = "the Responses API (/v1/responses) is not implemented by this engine"
_NPU = "an RNGD runtime setting; this engine's backends do not use it"

# Options of Furiosa-LLM's `serve` (2025.x-2026.4) without a meaning here: (flags, argparse kwargs, why).
# Every default is None, so "given" is "not None".
IGNORED: list[tuple[tuple[str, ...], dict, str]] = [
    (("--reasoning-parser",), dict(type=str), _REASONING),
    (("--scheduler-kind",), dict(type=str), _SCHED),
    (("--estimation-time-limit-ms",), dict(type=int), _SCHED),
    (("--prefix-cache-lookahead-requests",), dict(type=int), _SCHED),
    (("--enable-overlap-scheduling",), dict(action=argparse.BooleanOptionalAction),
     "the engine loop already overlaps host work with the device's queue (--npu-queue-limit)"),
    (("--max-io-memory-mb",), dict(type=int), _NPU),
    (("--npu-io-cpus",), dict(type=str), _NPU),
    (("-pb", "--prefill-buckets"), dict(type=str, nargs="+"), _BUCKETS),
    (("-db", "--decode-buckets"), dict(type=str, nargs="+"), _BUCKETS),
    (("--max-prompt-len",), dict(type=int), _BUCKETS + "; a prompt may use max_model_len - 1 tokens"),
    (("--min-batch-size",), dict(type=int), _BUCKETS),
    (("--device-mesh",), dict(type=str), "use --devices with -pp/-dp"),
    (("--data-parallel-routing-policy",), dict(type=str),
     "data-parallel replicas (--data-parallel-size > 1, Ray actors) are routed to the least outstanding work in "
     "tokens (furiosa_llm.core.routing), the policy the simulator's --dispatch least_tokens models"),
    (("--speculative-model",), dict(type=str), _SPEC),
    (("--num-speculative-tokens",), dict(type=int), _SPEC),
    (("-draft-tp", "--speculative-draft-tensor-parallel-size"), dict(type=int), _SPEC),
    (("-draft-pp", "--speculative-draft-pipeline-parallel-size"), dict(type=int), _SPEC),
    (("-draft-dp", "--speculative-draft-data-parallel-size"), dict(type=int), _SPEC),
    (("--allowed-local-media-path",), dict(type=str), _MM),
    (("--allowed-media-domains",), dict(type=str, nargs="+"), _MM),
    (("--image-limit-per-prompt",), dict(type=int), _MM),
    (("--video-limit-per-prompt",), dict(type=int), _MM),
    (("--interleave-mm-strings",), dict(action="store_true"), _MM),
    (("--enable-responses-api-store",), dict(action="store_true"), _RESP),
    (("--responses-api-store-max-entries",), dict(type=int), _RESP),
    (("--responses-api-store-ttl",), dict(type=int), _RESP),
]


def parse_allowed_origins(value: str | list) -> list[str]:
    """``--allowed-origins``: a JSON list (Furiosa-LLM's form, e.g. ``'["http://a", "http://b"]'``), a
    JSON string, or plain text: ``*`` or comma-separated origins."""
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
        return parsed
    if isinstance(parsed, str):
        value = parsed
    elif parsed is not None:
        raise argparse.ArgumentTypeError(f"expected a JSON list of origins or comma-separated origins, got {value!r}")
    origins = [v.strip() for v in value.split(",") if v.strip()]
    if not origins:
        raise argparse.ArgumentTypeError(f"no origins in {value!r}")
    return origins


def int_at_least(name: str, lo: int = 1):
    """An argparse ``type``: an int >= ``lo``, else a usage error naming ``name`` and the value."""
    def conv(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={v!r}: expected an int >= {lo}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"{name}={n}: must be >= {lo}")
        return n
    return conv


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from furiosa_llm.api.engine_args import AsyncEngineArgs

    p = sub.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API.",
                       description="Serve MODEL over an OpenAI-compatible HTTP API (Furiosa-LLM's `serve` options).")
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face model id (in the local cache), a model folder, a .gguf file, or "
                        "'smollm2-135m-instruct' (embedded default). --model MODEL is accepted too.")
    AsyncEngineArgs.add_cli_args(p)
    model = p._option_string_actions["--model"]  # the positional form is the usual one; either is enough
    model.required = False
    model.default = None

    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="Host to bind the server to (default: %(default)s).")
    g.add_argument("--port", type=int, default=8000, help="Port to bind the server to (default: %(default)s).")
    g.add_argument("--api-key", default=os.environ.get("FURIOSA_LLM_API_KEY"),
                   help="Require 'Authorization: Bearer KEY' on /v1 endpoints (default: $FURIOSA_LLM_API_KEY, else none).")
    g.add_argument("--served-model-name", default=None, help="The model name clients use. Default: MODEL.")
    g.add_argument("--chat-template", default=None,
                   help="A Jinja chat template, or a file holding one. Default: the tokenizer's.")
    g.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string", "openai"],
                   help="How a message's content reaches the chat template: 'string' (text parts joined), 'openai' "
                        "(a list of {'type': 'text', 'text': ...} parts), or 'auto' (detected from the template).")
    g.add_argument("--response-role", default="assistant",
                   help="Role of the generated message in /v1/chat/completions responses (default: %(default)s).")
    g.add_argument("--allowed-origins", type=parse_allowed_origins, default=["*"],
                   help='CORS: allowed origins, a JSON list or comma-separated (default: ["*"]).')
    g.add_argument("--allowed-methods", type=parse_allowed_origins, default=["*"],
                   help='CORS: allowed methods (default: ["*"]).')
    g.add_argument("--allowed-headers", type=parse_allowed_origins, default=["*"],
                   help='CORS: allowed headers (default: ["*"]).')
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials.")
    g.add_argument("--max-concurrency", type=int_at_least("max_concurrency"), default=None,
                   help="The most requests decoded together in one step (caps --max-processing-samples).")
    g.add_argument("--max-batch-size", type=int_at_least("max_batch_size"), default=None,
                   help="The most requests in one batch (caps --max-processing-samples).")
    g.add_argument("-tp", "--tensor-parallel-size", type=int_at_least("tensor_parallel_size"), default=None,
                   help="PEs per pipeline stage. The torch backend runs each replica on one device: only 1 applies.")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='Let the model choose to call tools (tool_choice="auto"); needs --tool-call-parser.')
    g.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="How tool calls are read from the output with tool_choice=\"auto\": hermes (<tool_call> JSON, "
                        "Hermes/Qwen) or llama3_json (Llama 3.1/3.2 JSON).")
    g.add_argument("--disable-log-stats", action="store_true", help="Disable the periodic stats log line.")
    g.add_argument("--log-interval", type=float, default=10.0,
                   help="Seconds between stats log lines (0 turns them off; default %(default)s).")
    g.add_argument("--enable-metrics", action="store_true",
                   help="Accepted for older command lines: /metrics is always served.")
    g.add_argument("--enable-payload-logging", action="store_true",
                   help="Log the body of every completion and chat request (may expose sensitive data).")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: %(default)s).")
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="Disable uvicorn's access log.")

    ig = p.add_argument_group("accepted for compatibility, without effect here (each one given is named in a warning)")
    for flags, kwargs, why in IGNORED:
        ig.add_argument(*flags, default=None, help=f"Ignored: {why}.", **kwargs)
    p.set_defaults(func=cmd_serve)
    return p


def ignored_flag_warnings(ns: argparse.Namespace) -> list[str]:
    """One message per option given that has no effect here, naming it and saying why."""
    out = []
    for flags, _kwargs, why in IGNORED:
        dest = flags[-1].lstrip("-").replace("-", "_")
        value = getattr(ns, dest, None)
        if value is not None:
            out.append(f"{flags[-1]}={value!r} is accepted but ignored: {why}")
    tp = getattr(ns, "tensor_parallel_size", None)
    if tp is not None and tp != 1:
        out.append(f"--tensor-parallel-size={tp} is accepted but ignored: the torch backend runs each replica on "
                   "one device (tensor_parallel_size=1); `furiosa-llm simulate -tp` models tensor parallelism")
    return out


def resolve_serve_args(ns: argparse.Namespace) -> argparse.Namespace:
    """Settle the options that map onto others: the model (positional or --model) and the caps on the
    running set (--max-concurrency, --max-batch-size). Raises ``ValueError`` naming the option."""
    pos, opt = ns.model_positional, ns.model
    if pos is not None and opt is not None and pos != opt:
        raise ValueError(f"model given twice: {pos!r} (positional) and --model {opt!r}")
    ns.model = pos if pos is not None else opt
    if ns.model is None:
        raise ValueError("no model: give it as `furiosa-llm serve MODEL` (or --model MODEL)")
    caps = [v for v in (ns.max_processing_samples, ns.max_concurrency, ns.max_batch_size) if v is not None]
    if caps:
        ns.max_processing_samples = min(caps)
    if not 0 < ns.port < 65536:
        raise ValueError(f"port={ns.port}: must be in 1-65535")
    if ns.log_interval < 0:
        raise ValueError(f"log_interval={ns.log_interval}: must be >= 0")
    return ns


def load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"chat_template={value!r}: no such file, and not a Jinja template")
    return value


def cmd_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from furiosa_llm.api.async_llm_engine import AsyncLLMEngine
    from furiosa_llm.api.engine_args import AsyncEngineArgs

    from .openai.api_server import create_app

    resolve_serve_args(ns)
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    for message in ignored_flag_warnings(ns):
        logger.warning(message)
    template = load_chat_template(ns.chat_template)
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs.from_cli_args(ns))
    name = ns.served_model_name or ns.model
    app = create_app(engine, served_model_name=name, api_key=ns.api_key, chat_template=template,
                     log_interval_s=0.0 if ns.disable_log_stats else ns.log_interval, response_role=ns.response_role,
                     chat_template_content_format=ns.chat_template_content_format,
                     allowed_origins=ns.allowed_origins, allowed_methods=ns.allowed_methods,
                     allowed_headers=ns.allowed_headers, allow_credentials=ns.allow_credentials,
                     enable_payload_logging=ns.enable_payload_logging,
                     tool_call_parser=ns.tool_call_parser, enable_auto_tool_choice=ns.enable_auto_tool_choice)
    logger.info("serving %s on http://%s:%d", name, ns.host, ns.port)
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level,
                    access_log=not ns.disable_uvicorn_access_log, timeout_keep_alive=30)
    finally:
        engine.shutdown()
    return 0
