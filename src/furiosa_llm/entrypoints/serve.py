"""``furiosa-llm serve``: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger("furiosa_llm.server")


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from furiosa_llm.api.engine_args import AsyncEngineArgs

    p = sub.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API.")
    AsyncEngineArgs.add_cli_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="Address to listen on (default 0.0.0.0).")
    g.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000).")
    g.add_argument("--api-key", default=os.environ.get("FURIOSA_LLM_API_KEY"),
                   help="Require 'Authorization: Bearer KEY' on /v1 endpoints (default: $FURIOSA_LLM_API_KEY, else none).")
    g.add_argument("--chat-template", default=None, help="A Jinja chat template, or a file holding one. Default: the tokenizer's.")
    g.add_argument("--served-model-name", default=None, help="The model name clients use. Default: --model.")
    g.add_argument("--log-interval", type=float, default=10.0, help="Seconds between stats log lines (0 turns them off).")
    g.add_argument("--uvicorn-log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


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

    if not 0 < ns.port < 65536:
        raise ValueError(f"port={ns.port}: must be in 1-65535")
    template = load_chat_template(ns.chat_template)
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs.from_cli_args(ns))
    app = create_app(engine, served_model_name=ns.served_model_name or ns.model, api_key=ns.api_key,
                     chat_template=template, log_interval_s=ns.log_interval)
    logger.info("serving %s on http://%s:%d", ns.served_model_name or ns.model, ns.host, ns.port)
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level, timeout_keep_alive=30)
    finally:
        engine.shutdown()
    return 0
