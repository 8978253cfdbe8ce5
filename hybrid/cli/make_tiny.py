"""`hybrid make-tiny`: write a small deterministic checkpoint of the K2 architecture (hybrid/models/tiny.py)."""
from __future__ import annotations

from pathlib import Path

from hybrid.cli.engine_options import add_parser
from hybrid.core.config import LAYOUTS


def add_make_tiny_parser(sub) -> None:
    t = add_parser(sub, "make-tiny", help="write a small deterministic checkpoint of the K2 architecture")
    t.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    t.add_argument("--preset", default="tiny", choices=["tiny", "bench"],
                   help="tiny: a few MiB, for tests; bench: about 5.6 GB, for timings")
    t.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    t.add_argument("--weights", default="fp8", choices=["fp8", "bf16"], help="fp8 = as the K2 release stores them")
    t.add_argument("--layout", default="k2", choices=LAYOUTS,
                   help="k2 = the K2 / K2-Thinking release's folder; k25 = the K2.5 / K2.6 / K2.7 release's "
                        "(kimi_k25 config, text weights under language_model., a small vision tower)")
    t.set_defaults(func=cmd_make_tiny)


def cmd_make_tiny(a) -> int:
    from hybrid.models.tiny import make_tiny
    out = make_tiny(a.out, preset=a.preset, seed=a.seed, weights=a.weights, quiet=a.preset == "tiny", layout=a.layout)
    print(f"wrote {a.preset} model to {out}")
    return 0
