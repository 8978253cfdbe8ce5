"""`hybrid` command line: generate, serve, profile, plan, make-tiny."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .cli_engine import add_engine_options, load_engine


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid", description="Run Kimi K2 / DeepSeek-V3 with routed experts in host RAM.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text or token ids")
    add_engine_options(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (rendered with the K2 chat template unless --raw)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    g.add_argument("--raw", action="store_true", help="encode --prompt as plain text, without the chat template")
    g.add_argument("--system", help="system prompt for the chat template (default: K2's)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--json", action="store_true", help='print {"tokens", "text", "stats"} as one JSON object')
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("make-tiny", help="write a small deterministic checkpoint of the K2 architecture")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weights", default="fp8", choices=["fp8", "bf16"], help="fp8 = as the K2 release stores them")
    t.set_defaults(func=cmd_make_tiny)

    from .server import add_serve_parser
    add_serve_parser(sub)
    from .profile_cli import add_profile_parser
    add_profile_parser(sub)
    from .plan_cli import add_plan_parser
    add_plan_parser(sub)
    return p


def cmd_generate(a) -> int:
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    eng = load_engine(a)
    model_dir = eng.info["model_dir"]
    if not a.json:
        print(eng.plan.describe(), file=sys.stderr)
    tok = eng.tokenizer
    if a.prompt_ids is not None:
        ids = a.prompt_ids
    else:
        if tok is None:
            raise ValueError(f"{model_dir} has no tokenizer files (tiktoken.model, tokenizer_config.json); "
                             f"pass --prompt-ids instead of --prompt")
        text = a.prompt if a.prompt is not None else "Hello!"
        if a.raw:
            ids = tok.encode(text)
        else:
            from .chat import DEFAULT_SYSTEM, encode_chat
            msgs = [{"role": "system", "content": a.system or DEFAULT_SYSTEM}, {"role": "user", "content": text}]
            ids = encode_chat(tok, msgs)
    new = eng.generate(ids, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    text_out = tok.decode(new, skip_special=True) if tok is not None else None
    s = eng.stats()
    if a.json:
        print(json.dumps({"tokens": new, "text": text_out, "stats": s}))
    else:
        print(text_out if text_out is not None else ",".join(map(str, new)))
    act = s["expert_activations"]
    print(f"[hybrid] prefill {s['prefill_tokens']} tok at {s['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {s['decode_tokens']} tok at {s['decode_tokens_per_s']:.1f} tok/s; "
          f"routed experts ({s['experts']}): {act['cpu']} on CPU, {act['hot_set']} in the device hot set, "
          f"{act['device']} on the device (reference); device={s['device']}", file=sys.stderr)
    return 0


def cmd_make_tiny(a) -> int:
    from .tiny import make_tiny
    out = make_tiny(a.out, preset=a.preset, seed=a.seed, weights=a.weights, quiet=a.preset == "tiny")
    print(f"wrote {a.preset} model to {out}")
    return 0


def main(argv=None) -> int:
    from quant.errors import CheckpointError
    from .config import ConfigError
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)   # unknown config fields etc.; errors below still print
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"hybrid: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybrid: interrupted", file=sys.stderr)
        return 130
