"""`hybrid profile`: record routing traces, synthesize K2-scale ones, import SGLang's, analyze any of them.

    hybrid profile --model DIR --prompts FILE --out DIR [--max-new-tokens N]     (= profile record ...)
    hybrid profile record --model DIR --prompts FILE --out DIR [--max-new-tokens N] [--no-report]
    hybrid profile synth --config kimi-k2 --out DIR [--requests R --prompt-tokens P --new-tokens D --seed S]
    hybrid profile import FILE --config kimi-k2|MODEL_DIR --out DIR [--format sglang|routed-experts]
    hybrid profile analyze TRACE --out DIR [--gpu-expert-budget 10%|38/layer] [--replay-layers 4]
                                           [--transfer-budget unlimited|0.25/layer]
                                           [--model DIR]  (checks that the trace is from that model)
Every action but analyze writes DIR/trace.npz and then (unless --no-report) the report into DIR.
Prompt files: plain text, one prompt per line (rendered with K2's chat template unless --raw); or JSONL
(.jsonl, or lines starting with "{" / "["): {"messages": [...]}, a bare message list, {"prompt": "..."}, or
{"prompt_ids": [1, 2, 3]}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from hybrid.cli.engine_options import HelpFormatter, add_deprecated, add_option, add_parser

_S = argparse.SUPPRESS


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Add `profile` (with sub-actions record, synth, import, analyze) to a `hybrid` subparsers object."""
    p = add_parser(subparsers, "profile", help="routing traces, hot-set what-ifs, plots, placement files",
                   description=__doc__)
    _record_args(p, default=True)
    acts = p.add_subparsers(dest="action", help="what to do (default: record)")
    _record_args(add_parser(acts, "record", help="run prompts through a model and record its routing"), False)
    s = add_parser(acts, "synth", help="a synthetic trace with a real model's routing shape")
    s.add_argument("--config", default="kimi-k2", help="kimi-k2 | deepseek-v3 | a model folder")
    s.add_argument("--out", type=Path, required=True, help="output folder (trace.npz and the report)")
    s.add_argument("--requests", type=int, default=32, help="requests to synthesize")
    s.add_argument("--prompt-tokens", type=int, default=768, help="prompt tokens per request")
    s.add_argument("--new-tokens", type=int, default=256, help="decoded tokens per request")
    s.add_argument("--layers", type=int, help="only the first N MoE layers (quick looks; default: all)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the synthetic routing")
    _analysis_args(s, default=False)
    i = add_parser(acts, "import", help="import SGLang routing (recorder dump .pt, or return_routed_experts JSONL)")
    i.add_argument("file", type=Path, help="the SGLang dump (.pt) or return_routed_experts file (.jsonl/.json)")
    i.add_argument("--config", required=True, help="kimi-k2 | deepseek-v3 | a model folder (the served model)")
    i.add_argument("--format", choices=["auto", "sglang", "routed-experts"], default="auto",
                   help="the file's kind (auto: routed-experts for .jsonl/.json, else sglang)")
    i.add_argument("--out", type=Path, required=True, help="output folder (trace.npz and the report)")
    _analysis_args(i, default=False)
    a = add_parser(acts, "analyze", help="report, plots and placement for a trace")
    a.add_argument("trace", type=Path, help="trace.npz written by record, synth or import")
    a.add_argument("--out", type=Path, required=True, help="output folder for the report")
    a.add_argument("--model", type=Path, help="check that the trace matches this model folder")
    _analysis_args(a, report_flag=False, default=False)
    p.set_defaults(func=cmd_profile)
    return p


def _defaults(default: bool):
    """(value -> the flag's default, value -> help note): the parser's own defaults, or, on a sub-action, none
    (argparse would reset what was given before the action to them; the parent's apply) named in the help."""
    if default:
        return (lambda v: v), (lambda v: "")
    return (lambda v: _S), (lambda v: f" (default: {v})")


def _record_args(p, default: bool) -> None:
    d, shown = _defaults(default)
    p.add_argument("--model", type=Path, default=d(None), help="model folder (default: the bundled tiny model)")
    p.add_argument("--prompts", type=Path, default=d(None), help="text (one prompt per line) or JSONL")
    p.add_argument("--out", type=Path, default=d(None), help="output folder")
    p.add_argument("--max-new-tokens", type=int, default=d(32), help="tokens to generate per prompt" + shown(32))
    p.add_argument("--raw", action="store_true", default=d(False), help="encode text prompts without the chat template")
    add_option(p, "device", default=d("auto"), note=shown("auto"))
    add_option(p, "experts", default=d("auto"), note=shown("auto"))
    _analysis_args(p, default=default)


def _analysis_args(p, report_flag: bool = True, default: bool = True) -> None:
    d, shown = _defaults(default)
    add_option(p, "gpu_expert_budget", default=d("10%"), note=" -- here the placement's size: a share or experts "
               "per layer (a trace knows no bytes)" + shown("10%%"))
    add_deprecated(p, "--budget", "--gpu-expert-budget", budget_as_hot_set)
    p.add_argument("--replay-layers", type=int, default=d(4), help="layers to replay policies on, evenly spaced "
                   "(0 = all); ~13 s per layer per 32k K2 tokens" + shown(4))
    add_option(p, "transfer_budget", default=d("unlimited"), note=" -- here the replay's: auto, copies per layer "
               "or unlimited (a trace knows no bytes)" + shown("unlimited"))
    add_deprecated(p, "--loads-per-token", "--transfer-budget", loads_as_transfer)
    p.add_argument("--quiet", action="store_true", default=d(False),
                   help="no progress bars (they are drawn only when stderr is a terminal)" + shown(False))
    if report_flag:
        p.add_argument("--no-report", action="store_true", default=d(False), help="write the trace only")


def budget_as_hot_set(text: str) -> str:
    """The deprecated --budget (10%, a fraction 0.1, or experts per layer 38) in --gpu-expert-budget's grammar."""
    t = text.strip()
    if t.endswith("%"):
        return t
    try:
        v = float(t)
    except ValueError:
        return t                                     # the new flag's parser names the grammar
    return f"{int(v)}/layer" if v >= 1 and v == int(v) else f"{100 * v:g}%"


def loads_as_transfer(text: str) -> str:
    """The deprecated --loads-per-token X (experts per token per layer) in --transfer-budget's grammar."""
    t = text.strip()
    return "unlimited" if t in ("inf", "infinity") else f"{t}/layer"


def cmd_profile(args) -> int:
    """Run the profile action; progress bars (model load, recording, synthesis, replay) unless --quiet."""
    from hybrid.core.progress import silenced
    with silenced(args.quiet):
        return _profile(args)


def _profile(args) -> int:
    action = getattr(args, "action", None) or "record"
    if action == "analyze":
        from hybrid.profile.trace import read_trace
        expect = _config(args.model) if args.model else None
        trace = read_trace(args.trace, expect=expect)
        return _analyze(trace, args)
    if action == "record":
        trace = _record(args)
    elif action == "synth":
        from hybrid.profile.synth import SynthParams, synthesize
        params = SynthParams(n_requests=args.requests, prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new_tokens, seed=args.seed)
        trace = synthesize(_trace_model(args.config), params, n_layers=args.layers)
    else:
        trace = _import(args)
    from hybrid.profile.trace import write_trace
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_trace(trace, args.out / "trace.npz")
    print(f"wrote {path} ({trace.n_requests} requests, {trace.n_tokens} tokens, {trace.model.describe()})")
    return 0 if args.no_report else _analyze(trace, args)


def _analyze(trace, args) -> int:
    from hybrid.profile.analysis import analyze, n_of
    from hybrid.profile.report import write_report
    frac = args.gpu_expert_budget.share(trace.model.n_experts)
    if frac <= 0:
        raise ValueError(f"--gpu-expert-budget {args.gpu_expert_budget}: a placement needs at least one expert "
                         f"per layer; give e.g. 10% or 38/layer")
    res = analyze(trace, max_layers=args.replay_layers or None,
                  loads_per_token=args.transfer_budget.copies_per_layer())
    files = write_report(trace, res, args.out, frac)
    cov = res["coverage"]
    print(f"top 10 % of experts cover {100 * cov['global'][0.10]:.1f} % of activations by global frequency"
          + (f", {100 * cov['request'][0.10]:.1f} % by each request's own" if cov["request"] else ""))
    print(f"wrote {files['report']} and {len(files) - 1} more files "
          f"(placement: {n_of(frac, trace.model.n_experts)} experts per layer)")
    return 0


def _config(model_dir: Path):
    from hybrid.core.config import ModelConfig
    return ModelConfig.from_file(model_dir)


def _trace_model(spec: str):
    from hybrid.profile.synth import PRESETS
    from hybrid.profile.trace import TraceModel
    if spec in PRESETS:
        return PRESETS[spec]
    if Path(spec).exists():
        return TraceModel.from_config(_config(Path(spec)))
    raise ValueError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")


def _import(args):
    from hybrid.profile.trace_import import read_routed_experts, read_sglang_dump
    model = _trace_model(args.config)
    fmt = args.format
    if fmt == "auto":
        fmt = "routed-experts" if args.file.suffix in (".jsonl", ".json") else "sglang"
    return read_sglang_dump(args.file, model) if fmt == "sglang" else read_routed_experts(args.file, model)


def read_prompts(path: Path, tokenizer, raw: bool = False) -> list[list[int]]:
    """Token ids of every prompt in a prompts file (see the module docstring for the formats)."""
    lines = prompt_lines(path)
    jsonl = path.suffix == ".jsonl" or lines[0][1].lstrip()[:1] in ("{", "[")
    out = []
    for n, line in lines:
        item = _parse_json_line(line, f"{path}:{n}") if jsonl else line
        if isinstance(item, dict) and "prompt_ids" in item:
            out.append([int(x) for x in item["prompt_ids"]])
            continue
        if tokenizer is None:
            raise ValueError(f"{path}:{n}: the model has no tokenizer files; give prompts as "
                             f'{{"prompt_ids": [...]}} JSONL lines')
        from hybrid.text.chat import DEFAULT_SYSTEM, encode_chat
        if isinstance(item, dict) and "prompt" in item:
            item = item["prompt"]
        if isinstance(item, str):
            msgs = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": item}]
            out.append(tokenizer.encode(item) if raw else encode_chat(tokenizer, msgs))
        else:
            msgs = item.get("messages") if isinstance(item, dict) else item
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{path}:{n}: expected {{\"messages\": [...]}}, a message list, {{\"prompt\": "
                                 f"...}} or {{\"prompt_ids\": [...]}}")
            out.append(encode_chat(tokenizer, msgs))
    return out


def prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; raises before any model is loaded if there are none."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} holds no prompts; write one prompt per line, or JSONL with "
                         f'{{"messages": [...]}} per line')
    return lines


def _parse_json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); a JSONL prompts file needs one JSON value per line") from None


def _record(args):
    from hybrid.runtime.loader import load
    from hybrid.models.tiny import ensure_default_tiny
    from hybrid.profile.trace import record
    if args.prompts is None or args.out is None:
        raise ValueError("profile record needs --prompts FILE and --out DIR")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    prompt_lines(args.prompts)                      # an empty or missing file fails before the model loads
    model_dir = args.model or ensure_default_tiny()
    eng = load(model_dir, device=args.device, experts=args.experts)
    prompts = read_prompts(args.prompts, eng.tokenizer, args.raw)
    trace = record(eng, prompts, args.max_new_tokens)
    trace.params.update({"model_dir": str(model_dir), "prompts": str(args.prompts)})
    return trace


def main(argv=None) -> int:
    """Standalone entry (python -m hybrid.cli.profile ...): `hybrid profile` with the same arguments."""
    p = argparse.ArgumentParser(prog="hybrid", formatter_class=HelpFormatter)
    add_profile_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)])
    return _run(args)


def _run(args) -> int:
    from quant.errors import CheckpointError
    from hybrid.core.config import ConfigError
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"hybrid: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
