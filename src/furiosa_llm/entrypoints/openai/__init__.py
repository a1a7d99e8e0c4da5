"""The OpenAI-compatible HTTP server of ``furiosa-llm serve``."""
