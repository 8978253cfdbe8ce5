"""`hybrid generate`: prompt in (text through K2's chat template, or token ids), text or JSON out."""
from __future__ import annotations

import argparse
import json
import sys

from hybrid.cli.engine_options import add_engine_options, add_parser, load_engine, startup_summary
from hybrid.core.sampling import SamplingParams

DEFAULT_PROMPT = "Hello!"


def _ids(text: str) -> list[int]:
    """Comma-separated non-negative token ids; an empty entry (1,,2 or a trailing comma) is an error, not skipped."""
    parts = text.replace(" ", "").split(",")
    if not text.strip():
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    if not all(p.isdigit() for p in parts):
        bad = next(p for p in parts if not p.isdigit())
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated token ids (integers >= 0), got "
                                         f"{text!r}: entry {bad!r} is " + ("empty" if not bad else "not one"))
    return [int(p) for p in parts]


def add_generate_parser(sub) -> None:
    g = add_parser(sub, "generate", help="generate text or token ids")
    add_engine_options(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (rendered with the K2 chat template unless --raw; default: "
                                      f"{DEFAULT_PROMPT!r})")
    src.add_argument("--prompt-ids", type=_ids, help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    g.add_argument("--raw", action="store_true", help="encode --prompt as plain text, without the chat template")
    g.add_argument("--system", help="system prompt for the chat template (default: K2's)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate after the prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to "
                                                           "this probability mass (1 = all)")
    g.add_argument("--seed", type=int, help="sampling seed (default: none, a fresh draw each run)")
    g.add_argument("--json", action="store_true", help='print {"tokens", "text", "stats"} as one JSON object')
    g.set_defaults(func=cmd_generate)


def _prompt_ids(a, tok, model_dir) -> list[int]:
    if a.prompt_ids is not None:
        return a.prompt_ids
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer files (tiktoken.model, tokenizer_config.json); "
                         f"pass --prompt-ids instead of --prompt")
    text = a.prompt if a.prompt is not None else DEFAULT_PROMPT
    if a.raw:
        return tok.encode(text)
    from hybrid.text.chat import DEFAULT_SYSTEM, encode_chat
    return encode_chat(tok, [{"role": "system", "content": a.system or DEFAULT_SYSTEM},
                             {"role": "user", "content": text}])


def cmd_generate(a) -> int:
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, seed=a.seed)   # checked before loading
    eng = load_engine(a)
    if not a.json:
        print(startup_summary(eng), file=sys.stderr)
    tok = eng.tokenizer
    ids = _prompt_ids(a, tok, eng.info.model_dir)
    new = eng.generate(ids, a.max_new_tokens, sampling=sampling)
    text_out = tok.decode(new, skip_special=True) if tok is not None else None
    s = eng.stats()
    if a.json:
        print(json.dumps({"tokens": new, "text": text_out, "stats": s.to_dict()}))
    else:
        print(text_out if text_out is not None else ",".join(map(str, new)))
    act = s.expert_activations
    print(f"[hybrid] prefill {s.prefill_tokens} tok at {s.prefill_tokens_per_s:.1f} tok/s, "
          f"decode {s.decode_tokens} tok at {s.decode_tokens_per_s:.1f} tok/s; "
          f"routed experts ({s.experts}): {act.cpu} on CPU, {act.hot_set} in the device hot set, "
          f"{act.device} on the device (reference); device={s.device}; CPU kernels {s.cpu_kernels}", file=sys.stderr)
    return 0
