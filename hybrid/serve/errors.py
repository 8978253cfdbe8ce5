"""Errors for the client, in the shape of the API it called.

One exception type (ApiError) is raised everywhere in the server; it is rendered when it reaches the client:
    OpenAI (/v1/chat/completions, /v1/completions, ...):
        {"error": {"message": ..., "type": "invalid_request_error", "param": "temperature", "code": ...}}
    Anthropic (/v1/messages...):
        {"type": "error", "error": {"type": "invalid_request_error", "message": ...}}
Anthropic's shape has no `param`, so its message starts with the field's name.
"""
from __future__ import annotations

# Anthropic's error types by HTTP status (its API reference, "Errors"); other 4xx are invalid requests.
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}


class ApiError(Exception):
    """An error for the client; status is the HTTP status code, param the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """Anthropic's error object; the field at fault leads the message."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        lead = f"{self.param}: " if self.param and not self.message.startswith(self.param) else ""
        return {"type": "error", "error": {"type": kind, "message": lead + self.message}}


def is_anthropic(path: str) -> bool:
    """Requests to Anthropic's Messages API get errors in Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, e: ApiError) -> dict:
    return e.anthropic_body() if is_anthropic(path) else e.body()
