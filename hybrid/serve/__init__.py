"""`hybrid serve`: the OpenAI and Anthropic HTTP APIs over one engine (app, request validation, structured
output, SSE, streaming text, the worker thread, shutdown, keys, metrics)."""
