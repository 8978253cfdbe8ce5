"""`hybrid serve`: the command line of the OpenAI-compatible server (hybrid/serve/app.py)."""
from __future__ import annotations

from hybrid.cli.engine_options import add_engine_options, load_engine
from hybrid.serve.app import DEFAULT_MAX_BODY, create_app


def add_serve_parser(subparsers) -> None:
    """Add `serve` to the `hybrid` command line (sets func=cmd_serve)."""
    s = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_options(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; there is no auth)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default="kimi-k2", help="the model id clients must send")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 503")
    s.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / (1 << 20),
                   help="largest request body accepted (413 above)")
    s.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on Ctrl-C, how long running requests may finish before they are cut off")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


def cmd_serve(a) -> int:
    import uvicorn

    if a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {a.max_queue}")
    engine = load_engine(a)
    print(engine.plan.describe(), flush=True)
    app = create_app(engine, a.served_model_name, a.max_queue, int(a.max_body_mb * (1 << 20)))
    # Bounded shutdown: after the grace period open streams are cancelled, which cancels their jobs.
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=a.shutdown_grace_s)
    return 0
