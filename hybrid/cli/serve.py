"""`hybrid serve`: the command line of the OpenAI- and Anthropic-compatible server (hybrid/serve/app.py).

Everything that needs no model is checked first (flags, the API key, the port: it is bound before the model
loads, which takes minutes for K2), so a mistake costs seconds. Ctrl-C drains (hybrid/serve/drain.py).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

from hybrid.cli.engine_options import add_engine_options, add_parser, load_engine, runtime_options, startup_summary
from hybrid.serve.auth import API_KEY_ENV
from hybrid.serve.body import DEFAULT_MAX_BODY


def add_serve_parser(subparsers) -> None:
    """Add `serve` to the `hybrid` command line (sets func=cmd_serve)."""
    s = add_parser(subparsers, "serve", help="serve the model over OpenAI- and Anthropic-compatible HTTP APIs")
    add_engine_options(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    s.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY or x-api-key: KEY) on every endpoint but "
                        f"/health; default: ${API_KEY_ENV} if set, else no key")
    s.add_argument("--served-model-name", default="kimi-k2", help="the model id clients must send")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    s.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / (1 << 20),
                   help="largest request body accepted (413 above)")
    s.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on Ctrl-C, how long running requests may finish; then their streams end with an error event")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the HTTP server's log level")
    s.set_defaults(func=cmd_serve)


def _check(a) -> str | None:
    """Every check that needs no model; returns the API key to require (None: none)."""
    if a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {a.max_queue}")
    if not a.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be > 0, got {a.max_body_mb}")
    if not 0 <= a.shutdown_grace_s < float("inf"):
        raise ValueError(f"--shutdown-grace-s must be a number of seconds >= 0, got {a.shutdown_grace_s}")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {a.port}")
    runtime_options(a)                              # the engine flags' own checks
    key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise ValueError("--api-key is empty; give a key or leave the flag out")
    return key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:               # a host name: it may resolve to any interface
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); ValueError naming the address when it is taken."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} cannot be resolved ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; is another server running there? "
                         "Stop it or choose another --port") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(a) -> int:
    key = _check(a)
    if key is None and not _loopback(a.host):
        print(f"hybrid: warning: serving on {a.host} without an API key: anyone who can reach this address can "
              f"use the model. Pass --api-key KEY (or set ${API_KEY_ENV}).", file=sys.stderr, flush=True)
    sock = bind(a.host, a.port)
    from hybrid.serve.app import create_app        # the web stack and torch: only once the flags and port are good
    try:
        engine = load_engine(a)
        print(startup_summary(engine), flush=True)
        app = create_app(engine, a.served_model_name, a.max_queue, int(a.max_body_mb * (1 << 20)), api_key=key)
        host, port = sock.getsockname()[:2]
        print(f"hybrid: serving {a.served_model_name!r} on http://{host}:{port} (OpenAI /v1/chat/completions, "
              f"Anthropic /v1/messages){'; API key required' if key else ''}", flush=True)
        _server(app, a.log_level, a.shutdown_grace_s).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _server(app, log_level: str, grace_s: float):
    """A uvicorn.Server whose stop signal first drains the app (hybrid/serve/drain.py); uvicorn is imported
    here, not when the command line is built."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:          # a second Ctrl-C: stop now, without uvicorn's cancellation tracebacks
                print("hybrid: interrupted twice: stopped without waiting for running requests", file=sys.stderr,
                      flush=True)
                os._exit(130)
            self.config.app.state.drain.begin(grace_s)
            super().handle_exit(sig, frame)
    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=grace_s))
