"""`hybrid profile`: record routing traces, synthesize K2-scale ones, import SGLang's, analyze any of them.

    hybrid profile --model DIR --prompts FILE --out DIR [--max-new-tokens N]     (= profile record ...)
    hybrid profile record --model DIR --prompts FILE --out DIR [--max-new-tokens N] [--no-report]
    hybrid profile synth --config kimi-k2 --out DIR [--requests R --prompt-tokens P --new-tokens D --seed S]
    hybrid profile import FILE --config kimi-k2|MODEL_DIR --out DIR [--format sglang|routed-experts]
    hybrid profile analyze TRACE --out DIR [--budget 10%] [--replay-layers 4] [--loads-per-token X]
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

_S = argparse.SUPPRESS


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Add `profile` (with sub-actions record, synth, import, analyze) to a `hybrid` subparsers object."""
    p = subparsers.add_parser("profile", help="routing traces, hot-set what-ifs, plots, placement files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _record_args(p, default=True)
    acts = p.add_subparsers(dest="action")
    _record_args(acts.add_parser("record", help="run prompts through a model and record its routing"), False)
    s = acts.add_parser("synth", help="a synthetic trace with a real model's routing shape")
    s.add_argument("--config", default="kimi-k2", help="kimi-k2 | deepseek-v3 | a model folder")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--requests", type=int, default=32)
    s.add_argument("--prompt-tokens", type=int, default=768)
    s.add_argument("--new-tokens", type=int, default=256)
    s.add_argument("--layers", type=int, help="only the first N MoE layers (quick looks)")
    s.add_argument("--seed", type=int, default=0)
    _analysis_args(s, default=False)
    i = acts.add_parser("import", help="import SGLang routing (recorder dump .pt, or return_routed_experts JSONL)")
    i.add_argument("file", type=Path)
    i.add_argument("--config", required=True, help="kimi-k2 | deepseek-v3 | a model folder (the served model)")
    i.add_argument("--format", choices=["auto", "sglang", "routed-experts"], default="auto")
    i.add_argument("--out", type=Path, required=True)
    _analysis_args(i, default=False)
    a = acts.add_parser("analyze", help="report, plots and placement for a trace")
    a.add_argument("trace", type=Path)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--model", type=Path, help="check that the trace matches this model folder")
    _analysis_args(a, report_flag=False, default=False)
    p.set_defaults(func=cmd_profile)
    return p


def _record_args(p, default: bool) -> None:
    d = (lambda v: v) if default else (lambda v: _S)    # sub-action values must not be reset by the parent
    p.add_argument("--model", type=Path, default=d(None), help="model folder (default: the bundled tiny model)")
    p.add_argument("--prompts", type=Path, default=d(None), help="text (one prompt per line) or JSONL")
    p.add_argument("--out", type=Path, default=d(None), help="output folder")
    p.add_argument("--max-new-tokens", type=int, default=d(32))
    p.add_argument("--raw", action="store_true", default=d(False), help="encode text prompts without the chat template")
    p.add_argument("--device", default=d("auto"))
    p.add_argument("--experts", default=d("auto"))
    _analysis_args(p, default=default)


def _analysis_args(p, report_flag: bool = True, default: bool = True) -> None:
    d = (lambda v: v) if default else (lambda v: _S)
    p.add_argument("--budget", default=d("10%"), help="placement size: 10%%, 0.1, or experts per layer (38)")
    p.add_argument("--replay-layers", type=int, default=d(4),
                   help="layers to replay policies on, evenly spaced (0 = all); ~13 s per layer per 32k K2 tokens")
    p.add_argument("--loads-per-token", type=float, default=d(math.inf),
                   help="transfer budget in experts per token per layer for the replay (default unlimited)")
    p.add_argument("--quiet", action="store_true", default=d(False),
                   help="no progress bars (they are drawn only when stderr is a terminal)")
    if report_flag:
        p.add_argument("--no-report", action="store_true", default=d(False), help="write the trace only")


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
    frac = parse_budget(args.budget, trace.model.n_experts)
    res = analyze(trace, max_layers=args.replay_layers or None, loads_per_token=args.loads_per_token)
    files = write_report(trace, res, args.out, frac)
    cov = res["coverage"]
    print(f"top 10 % of experts cover {100 * cov['global'][0.10]:.1f} % of activations by global frequency"
          + (f", {100 * cov['request'][0.10]:.1f} % by each request's own" if cov["request"] else ""))
    print(f"wrote {files['report']} and {len(files) - 1} more files "
          f"(placement: {n_of(frac, trace.model.n_experts)} experts per layer)")
    return 0


def parse_budget(text: str, n_experts: int) -> float:
    """'10%' -> 0.1, '0.1' -> 0.1, '38' -> 38 / n_experts."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"--budget {text!r}: give a percentage (10%), a fraction (0.1) or experts per layer (38)")
    if not t.endswith("%") and v >= 1 and v == int(v):
        v = v / n_experts
    if not 0 < v <= 1:
        raise ValueError(f"--budget {text!r} is outside (0, 100 %] of the {n_experts} experts per layer")
    return v


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
    p = argparse.ArgumentParser(prog="hybrid")
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
