"""The hot set's two knobs, one grammar each, parsed once into a typed value.

Every command that sizes or moves the hot set (`hybrid generate`, `serve`, `plan`, `profile`, and
`hybrid.load`) reads `--gpu-expert-budget` as a HotSetSize and `--transfer-budget` as a TransferBudget with
these parsers, so a value copied from one command to another means the same machine. The value is resolved
to experts per MoE layer, or copies per token per MoE layer, by one method each, where the model's sizes are
known.

    --gpu-expert-budget   2GiB | 500MB | 1073741824 (bytes, all devices)   25% (a share of each MoE layer's
                          routed experts)   38/layer (experts per MoE layer)   auto (all device memory left)
    --transfer-budget     auto (one copy per MoE layer every 16 tokens)   64MiB | 1048576 (bytes per token,
                          all MoE layers)   0.25/layer (copies per token per MoE layer)   unlimited
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from hybrid.core.policies import AUTO_LOADS_PER_TOKEN

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PER_LAYER = "/layer"

HOT_SET_GRAMMAR = ("bytes on the device(s), e.g. 2GiB (plain digits: bytes); a share of each MoE layer's routed "
                   "experts, e.g. 25%; experts per MoE layer, e.g. 38/layer; or auto (all device memory left)")
TRANSFER_GRAMMAR = ("auto (one copy per MoE layer every 16 tokens); bytes per token over all MoE layers, e.g. "
                    "64MiB (plain digits: bytes); copies per token per MoE layer, e.g. 0.25/layer; or unlimited")


MAX_SIZE = 2**60      # 1 EiB: any larger size is a typo (1e400, 1e999GiB), refused instead of overflowing


def parse_size(text: str | int | float) -> int:
    """"2GiB", "500MB", "1.5e9", 123 -> bytes; ValueError (naming the value) for a negative, non-finite or
    absurdly large size."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read size {text!r}; write e.g. 2GiB, 500MB or a number of bytes")
        try:
            v = float(m.group(1)) * _UNITS[m.group(2).lower()]
        except ValueError:
            raise ValueError(f"cannot read size {text!r}; write e.g. 2GiB, 500MB or a number of bytes") from None
    if not 0 <= v <= MAX_SIZE:        # also NaN and inf
        raise ValueError(f"size {text!r} is out of range; write a size from 0 to 1EiB, e.g. 2GiB")
    return int(v)


def _per_layer(text: str, flag: str, grammar: str) -> float | None:
    """"38/layer" -> 38.0; None when `text` is not written per layer."""
    if not text.endswith(_PER_LAYER):
        return None
    try:
        v = float(text[: -len(_PER_LAYER)])
    except ValueError:
        v = -1.0
    if not v >= 0 or math.isinf(v):
        raise ValueError(f"cannot read {flag} {text!r}; write {grammar}")
    return v


def _read_common(cls, value, words: tuple[str, ...]):
    """(the value when it is already parsed, an int of bytes or one of `words`, else None; the text to read)."""
    if isinstance(value, cls):
        return value, ""
    if isinstance(value, int) and not isinstance(value, bool):
        return cls("bytes", parse_size(value), str(value)), ""
    text = str(value).strip()
    return (cls(text, 0, text) if text in words else None), text


def _bytes(cls, text: str, flag: str, grammar: str):
    """The last reading of a knob's text: a byte size, else a ValueError naming the flag's whole grammar."""
    try:
        return cls("bytes", parse_size(text), text)
    except ValueError:
        raise ValueError(f"cannot read {flag} {text!r}; write {grammar}") from None


@dataclass(frozen=True)
class HotSetSize:
    """The hot-set size as asked (--gpu-expert-budget, gpu_expert_budget=): `amount` is bytes (kind "bytes"),
    a share in 0..1 ("share"), experts per MoE layer ("per_layer") or unused ("auto")."""
    kind: Literal["bytes", "share", "per_layer", "auto"]
    amount: float = 0
    text: str = field(default="", compare=False)    # as the caller wrote it, for messages

    @classmethod
    def parse(cls, value: "HotSetSize | int | str") -> "HotSetSize":
        """A flag's text or a load() keyword (an int is bytes) -> HotSetSize; ValueError naming the grammar."""
        done, text = _read_common(cls, value, ("auto",))
        if done is not None:
            return done
        n = _per_layer(text, "--gpu-expert-budget", HOT_SET_GRAMMAR)
        if n is not None:
            if n != int(n):
                raise ValueError(f"--gpu-expert-budget {text!r}: experts per layer is a whole number, e.g. 38/layer")
            return cls("per_layer", int(n), text)
        if text.endswith("%"):
            try:
                share = float(text[:-1]) / 100
            except ValueError:
                share = -1.0
            if not 0 <= share <= 1:
                raise ValueError(f"--gpu-expert-budget {text!r}: a share lies in 0%..100%, e.g. 25%")
            return cls("share", share, text)
        return _bytes(cls, text, "--gpu-expert-budget", HOT_SET_GRAMMAR)

    @classmethod
    def experts(cls, n: int) -> "HotSetSize":
        """n experts per MoE layer (a static placement's size, a measured capacity)."""
        return cls("per_layer", int(n), f"{int(n)}{_PER_LAYER}")

    @property
    def is_zero(self) -> bool:
        return self.kind != "auto" and self.amount == 0

    def experts_per_layer(self, n_experts: int, expert_bytes: int | None = None, moe_layers: int = 0,
                          buffer_bytes: int = 0) -> int:
        """Experts per MoE layer asked for, at most n_experts (what fits is the placement's business).

        Bytes are all devices' together and include `buffer_bytes` (the packed hot set's decode buffers);
        they need `expert_bytes` (one resident expert) and `moe_layers`: without them (a trace's replay)
        a byte size is a ValueError saying what to write instead."""
        if self.kind == "auto":
            return n_experts
        if self.kind == "share":
            return int(self.amount * n_experts + 1e-9)
        if self.kind == "per_layer":
            if self.amount > n_experts:
                raise ValueError(f"--gpu-expert-budget {self}: the model has {n_experts} routed experts per layer")
            return int(self.amount)
        if expert_bytes is None:
            raise ValueError(f"--gpu-expert-budget {self} is a byte size, but here no expert size is known; "
                             f"give a share (25%) or experts per layer (38/layer)")
        if not moe_layers:
            return 0
        return min(n_experts, int(max(0, self.amount - buffer_bytes) // (expert_bytes * moe_layers)))

    def share(self, n_experts: int) -> float:
        """The share of each layer's n_experts asked for, in 0..1 (a trace's placement, sized without bytes:
        a byte size is a ValueError, auto is all of them)."""
        if self.kind == "share":
            return self.amount
        return 1.0 if self.kind == "auto" else self.experts_per_layer(n_experts) / n_experts

    def __str__(self) -> str:
        return self.text or (f"{self.amount:g}" if self.kind == "bytes" else self.kind)


@dataclass(frozen=True)
class TransferBudget:
    """How much the hot set may copy to the device (--transfer-budget, transfer_budget=): `amount` is bytes
    per token over all MoE layers (kind "bytes") or copies per token per MoE layer ("per_layer")."""
    kind: Literal["auto", "bytes", "per_layer", "unlimited"]
    amount: float = 0
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, value: "TransferBudget | int | str") -> "TransferBudget":
        """A flag's text or a load() keyword (an int is bytes) -> TransferBudget; ValueError naming the grammar."""
        done, text = _read_common(cls, value, ("auto", "unlimited"))
        if done is not None:
            return done
        n = _per_layer(text, "--transfer-budget", TRANSFER_GRAMMAR)
        if n is not None:
            return cls("per_layer", n, text)
        return _bytes(cls, text, "--transfer-budget", TRANSFER_GRAMMAR)

    @classmethod
    def copies(cls, per_layer: float) -> "TransferBudget":
        """per_layer copies per token per MoE layer (inf: unlimited)."""
        if math.isinf(per_layer):
            return cls("unlimited", 0, "unlimited")
        return cls("per_layer", per_layer, f"{per_layer:g}{_PER_LAYER}")

    def copies_per_layer(self, expert_bytes: int | None = None, moe_layers: int = 0) -> float:
        """Expert copies per token per MoE layer (inf: unlimited). Bytes need `expert_bytes` (one resident
        expert) and `moe_layers`; without them (a trace's replay) a byte budget is a ValueError."""
        if self.kind == "auto":
            return AUTO_LOADS_PER_TOKEN
        if self.kind == "unlimited":
            return math.inf
        if self.kind == "per_layer":
            return self.amount
        if expert_bytes is None:
            raise ValueError(f"--transfer-budget {self} is in bytes, but here no expert size is known; give "
                             f"copies per token per MoE layer (0.25/layer), auto or unlimited")
        per_copy = expert_bytes * max(1, moe_layers)
        return self.amount / per_copy if per_copy else math.inf

    def __str__(self) -> str:
        return self.text or self.kind
