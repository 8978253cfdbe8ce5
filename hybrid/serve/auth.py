"""API keys: with a key set, every endpoint but /health wants it, as `Authorization: Bearer KEY` (OpenAI
clients) or `x-api-key: KEY` (Anthropic clients); otherwise 401 in the error shape of the API called."""
from __future__ import annotations

import hmac
import json

from hybrid.serve.errors import ApiError, error_body

API_KEY_ENV = "HYBRID_API_KEY"
OPEN_PATHS = ("/health",)      # load balancers probe it without credentials


def _presented(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1")
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    return None


class ApiKey:
    """Pure ASGI middleware; compares in constant time."""

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("the API key is empty; give a non-empty --api-key (or leave it out)")
        self.app, self._key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = _presented(scope["headers"])
        if given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), self._key):
            return await self.app(scope, receive, send)
        what = "no API key was given" if given is None else "the API key is not valid"
        err = ApiError(401, f"{what}: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'", None,
                       "invalid_api_key")
        body = json.dumps(error_body(scope["path"], err)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
