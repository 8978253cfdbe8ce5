"""Reading a request body as JSON, bounded in size and in nesting, for every endpoint.

Python's json module recurses once per nesting level: a body of 1,000 nested arrays raised RecursionError
(a 500, and the connection was reset). The nesting is measured before parsing, in one vectorized pass
over the bytes with strings blanked out, so a hostile body costs linear time and gets a 400.
"""
from __future__ import annotations

import asyncio
import json
import re

import numpy as np

from hybrid.serve.errors import ApiError

DEFAULT_MAX_BODY = 32 << 20    # K2's 128K-token context is ~0.5 MB of text; 32 MiB leaves room for tool schemas

# Deep enough for any real request (tool schemas nest a few tens of levels), far below the recursion limit
# (1,000) of the json module and of anything that walks the parsed body.
MAX_NESTING = 128
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)   # unrolled loop: 0.09 s, not 2.5 s, on a 30 MB string
_OPEN, _CLOSE = (np.zeros(256, np.int8) for _ in range(2))
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1


def nesting_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") == 0:
        return 0
    b = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    depth = np.cumsum(_OPEN[b].astype(np.int32) - _CLOSE[b])
    return int(depth.max(initial=0))


def parse_json(raw: bytes, max_nesting: int = MAX_NESTING):
    """raw -> the decoded JSON value; ApiError(400) for invalid JSON or nesting deeper than max_nesting."""
    depth = nesting_depth(raw) if raw.count(b"[") + raw.count(b"{") > max_nesting else 0
    if depth > max_nesting:
        raise ApiError(400, f"the request body nests arrays/objects {depth} levels deep; the limit is "
                            f"{max_nesting}", None, "nesting_too_deep")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


async def json_body(request, limit: int):
    """The request's body decoded as JSON: 413 over `limit` bytes (declared or streamed), 400 if invalid."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes",
                       None, "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", None, "body_too_large")
        chunks.append(chunk)
    return await asyncio.to_thread(parse_json, b"".join(chunks))     # off the loop: 32 MiB takes a while
