"""`hybrid serve`: the OpenAI-compatible HTTP API over one engine (app, request validation, SSE, streaming
text, the worker thread, metrics)."""
