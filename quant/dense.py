"""The dense (non-expert) linear weights in a stored format: which tensors they are, how a converted store
names them, and the reader the loader calls (DenseReader), which gives each as a PackedMatrix.

The dense linears are q_a / q_b (or q), kv_a, kv_b, o_proj, the shared experts', the dense layers' MLPs and
lm_head (DENSE_LINEARS); norms, the router (mlp.gate) and the embeddings are never in a packed format.

`hybrid-quant convert --dense int4|fp8|bf16` writes each dense linear in that format, named by STORED_NAMES
(the one table of those names), and records the format in the manifest ("dense_format"; "checkpoint" when
they were kept as the checkpoint stores them). A shape a format cannot hold (int4 needs K to be a multiple
of its group size and of 32) is stored as bf16, and the manifest lists those kinds ("dense_fallbacks").
MLA's absorbed decode multiplies by kv_b's K half transposed per head (q_abs[h] = W_UK[h]^T q_nope[h]); in
int4 that needs groups along the other dimension, so an int4 store also holds it quantized that way
(part "uk_t", [heads * r, dn]); fp8 and bf16 rearrange their bytes exactly (quant/packed.py).

    >>> with Checkpoint.open(store) as ck:
    ...     dense = DenseReader(ck, "int4", read_manifest(store))     # raises if the store holds another format
    ...     q_a = dense.linear("model.layers.1.self_attn.q_a_proj.weight")
    ...     gate, up, down = dense.mlp("model.layers.1.mlp.shared_experts")
    ...     uk_t, uv = dense.mla_kv_b("model.layers.1.self_attn.kv_b_proj.weight", heads=64, dn=128, dv=128)
    ...     dense.fallbacks                                            # {kind: why it is bf16}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quant.checkpoint import Checkpoint
from quant.codec import decode
from quant.formats import FORMAT_NAMES, f32_to_bf16_bits, get_format
from quant.int4 import GROUP_SIZES
from quant.packed import QUANTIZE_ROWS, PackedMatrix, holds, take_rows, transposed

# The non-expert linear layers, by module name without the layer prefix ("model.layers.N.").
DENSE_LINEARS = ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                 "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.shared_experts.gate_proj",
                 "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj", "lm_head")

# How a stored dense linear `<module>` is named, per (format, part): (codes tensor, scales tensor). "weight"
# is the matrix as the checkpoint has it [N, K]; "uk_t" is MLA kv_b's K half transposed per head,
# [heads * r, dn]. Safetensors dtypes: int4 codes U8 [N, K/2] in quant/int4.py's nibble layout with BF16
# scales [N, K/g]; fp8 F8_E4M3 [N, K] with an F32 [ceil(N/128), ceil(K/128)] grid (the release's names);
# bf16 BF16 [N, K].
STORED_NAMES = {
    ("int4", "weight"): ("weight_int4", "weight_int4_scale"),
    ("int4", "uk_t"): ("uk_t_int4", "uk_t_int4_scale"),
    ("fp8", "weight"): ("weight", "weight_scale_inv"),
    ("bf16", "weight"): ("weight", None),
}
CHECKPOINT = "checkpoint"          # the manifest's dense_format when convert kept the checkpoint's own


def dense_kind(name: str) -> str | None:
    """The DENSE_LINEARS entry a tensor belongs to ("self_attn.q_a_proj" for any of its stored names), or None."""
    module = name.rsplit(".", 1)[0]
    if module == "lm_head":
        return "lm_head"
    parts = module.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or ".experts." in name:
        return None
    kind = ".".join(parts[3:])
    return kind if kind in DENSE_LINEARS else None


def stored_names(module: str, fmt: str, part: str = "weight") -> tuple[str, str | None]:
    codes, scales = STORED_NAMES[(fmt, part)]
    return f"{module}.{codes}", None if scales is None else f"{module}.{scales}"


def to_tensors(m: PackedMatrix, module: str, part: str = "weight") -> list[tuple[str, torch.Tensor]]:
    """A one-group PackedMatrix as the tensors a store holds for it (STORED_NAMES), ready for write_sharded."""
    codes_name, scales_name = stored_names(module, m.fmt, part)
    codes = torch.from_numpy(np.ascontiguousarray(m.codes()))
    if m.fmt == "fp8":
        codes = codes.view(torch.float8_e4m3fn)
    elif m.fmt == "bf16":
        codes = codes.view(torch.int16).view(torch.bfloat16)
    out = [(codes_name, codes)]
    if scales_name:
        s = torch.from_numpy(np.ascontiguousarray(m.scales()))
        out.append((scales_name, s.view(torch.int16).view(torch.bfloat16) if m.fmt == "int4" else s))
    return out


class _Source:
    """One stored weight of a checkpoint, readable as float32 row ranges or as its stored arrays."""

    def __init__(self, ck: Checkpoint, module: str, group_size: int, part: str = "weight"):
        self.ck, self.module, self.group_size = ck, module, group_size
        int4_codes, int4_scales = stored_names(module, "int4", part)
        if int4_codes in ck:
            self.kind, self.names = "int4", (int4_codes, int4_scales)
            N, half = ck.shape(int4_codes)
            self.shape = (N, 2 * half)
        else:
            name = f"{module}.weight"
            self.kind = "fp8" if ck.is_fp8(name) else "float"
            self.names, self.shape = (name, None), tuple(ck.shape(name))
        self._arrays = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(codes, scales) as stored: int4 packed + bf16 bits, fp8 codes + grid; float: bf16 bits (rounded
        to nearest even when the checkpoint holds f32/f16)."""
        if self._arrays is None:
            n = self.names[0]
            if self.kind == "int4":
                self._arrays = (self.ck.get_raw(n).numpy(), _bits(self.ck.get_raw(self.names[1])))
            elif self.kind == "fp8":
                self._arrays = self.ck.get_fp8(n)
            else:
                t = self.ck.get_raw(n)
                self._arrays = (_bits(t) if t.dtype == torch.bfloat16 else f32_to_bf16_bits(t.float().numpy()), None)
        return self._arrays

    def rows(self, g: int, r0: int, r1: int) -> np.ndarray:
        """float32 rows [r0, r1) (r0 a multiple of 128): decoded exactly from the stored arrays."""
        codes, scales = self.arrays()
        per = get_format(self.fmt).scale_rows                         # rows one scale covers (fp8: 128)
        return decode(self.fmt, codes[r0:r1], None if scales is None else scales[r0 // per: -(-r1 // per)],
                      self.group_size)

    @property
    def fmt(self) -> str:
        """The format arrays() gives the weight in: its own, or bf16 for a float weight."""
        return "bf16" if self.kind == "float" else self.kind


def _bits(t: torch.Tensor) -> np.ndarray:
    """A BF16 tensor's bit patterns as uint16 (numpy has no bfloat16)."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


class DenseReader:
    """The dense linears of one checkpoint or converted store, as PackedMatrix in one format.

    Args:
        ck: the open Checkpoint (an HF folder or a converted store).
        fmt: "int4", "fp8", "bf16", or "auto": each weight in the format it is stored in (FP8 in the
            official release; a bf16/f32 weight as bf16).
        manifest: a converted store's manifest (quant.verify.read_manifest), None for an HF folder. A store
            converted with --dense X gives X only: asking another format raises ValueError at once.
        group_size: int4 group size when quantizing (default: the store's, else 32).
    Weights stored in the asked format are wrapped as they are; others are quantized from their exact float
    values at load (fine for small checkpoints; convert K2 with --dense instead). A shape the format cannot
    hold comes as bf16; `fallbacks` maps each such kind to the reason, for one line per kind.
    """

    def __init__(self, ck: Checkpoint, fmt: str = "auto", manifest: dict | None = None, group_size: int | None = None):
        if fmt != "auto" and fmt not in FORMAT_NAMES:
            raise ValueError(f"dense format {fmt!r}; use auto or one of {', '.join(FORMAT_NAMES)}")
        stored = (manifest or {}).get("dense_format", CHECKPOINT)
        if stored != CHECKPOINT and fmt not in ("auto", stored):
            raise ValueError(f"this store holds {stored} dense weights; pass --dense {stored} (or auto), or convert "
                             f"again with --dense {fmt}")
        self.ck, self.fmt = ck, fmt
        self.group_size = int((manifest or {}).get("dense_group_size") or group_size or 32)
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size}; use one of {GROUP_SIZES}")
        self.fallbacks: dict[str, str] = {}

    def _want(self, src: _Source) -> str:
        return self.fmt if self.fmt != "auto" else ("bf16" if src.kind == "float" else src.kind)

    def _note(self, kind: str, m: PackedMatrix) -> PackedMatrix:
        if m.fell_back:
            self.fallbacks[kind] = (f"{m.requested} cannot hold [{m.rows}, {m.cols}] (its input size must be a "
                                    f"multiple of {max(self.group_size, 32)}): bf16")
        return m

    def _packed(self, src: _Source, fmt: str, kind: str) -> PackedMatrix:
        if src.fmt == fmt:
            return PackedMatrix.from_arrays(fmt, *src.arrays(), group_size=self.group_size)
        return self._note(kind, PackedMatrix.quantize_rows(src.rows, (1, *src.shape), fmt, self.group_size))

    def linear(self, name: str) -> PackedMatrix:
        """The dense linear `name` (its checkpoint name, "<module>.weight") as a one-group PackedMatrix."""
        module = _module(name)
        src = _Source(self.ck, module, self.group_size)
        return self._packed(src, self._want(src), dense_kind(name) or module)

    def mlp(self, prefix: str) -> tuple[PackedMatrix, PackedMatrix, PackedMatrix]:
        """(gate, up, down) of the SwiGLU MLP at `prefix` ("model.layers.0.mlp", "...mlp.shared_experts"), in one
        format for PackedMLP: bf16 for all three when the format cannot hold both the hidden and inter sizes."""
        srcs = [_Source(self.ck, f"{prefix}.{m}_proj", self.group_size) for m in ("gate", "up", "down")]
        fmt = self._want(srcs[0])
        H, I = srcs[0].shape[1], srcs[0].shape[0]
        kind = dense_kind(f"{prefix}.gate_proj.weight") or prefix
        if not (holds(fmt, H, self.group_size) and holds(fmt, I, self.group_size)):
            self.fallbacks[kind.rsplit(".", 1)[0]] = (f"{fmt} cannot hold hidden {H} / inter {I} (both must be "
                                                      f"multiples of {max(self.group_size, 32)}): bf16")
            fmt = "bf16"
        return tuple(self._packed(s, fmt, kind) for s in srcs)

    def mla_kv_b(self, name: str, heads: int, dn: int, dv: int) -> tuple[PackedMatrix, PackedMatrix]:
        """kv_b_proj [heads * (dn + dv), r] as MLA's absorbed decode uses it, per head h:
        uk_t [heads, r, dn] (q_abs[h] = uk_t[h] @ q_nope[h]) and uv [heads, dv, r] (o[h] = uv[h] @ lat[h])."""
        module = _module(name)
        src = _Source(self.ck, module, self.group_size)
        fmt, (N, r) = self._want(src), src.shape
        if N != heads * (dn + dv):
            raise ValueError(f"{name} has {N} rows, not heads * (dn + dv) = {heads} * ({dn} + {dv}); check the config")
        w = self._packed(src, fmt, "self_attn.kv_b_proj")
        starts = np.arange(heads) * (dn + dv)
        try:
            uv = take_rows(w, starts + dn, dv)
            if w.fmt == "int4":
                return self._uk_t_int4(src, module, heads, dn, dv, r), uv
            return transposed(take_rows(w, starts, dn)), uv
        except ValueError as e:               # fp8 blocks cut by the head slices: exact bf16 instead
            self.fallbacks["self_attn.kv_b_proj"] = f"{w.fmt} per-head slices ({e}): bf16"
            f = src.rows(0, 0, N).reshape(heads, dn + dv, r)
            return (self._note("self_attn.kv_b_proj", PackedMatrix.quantize(f[:, :dn].transpose(0, 2, 1), "bf16")),
                    PackedMatrix.quantize(f[:, dn:], "bf16"))

    def _uk_t_int4(self, src: _Source, module: str, heads: int, dn: int, dv: int, r: int) -> PackedMatrix:
        """W_UK^T per head in int4, groups along dn: a store's "uk_t" part, else quantized from the float weight
        (for a store without it: from its int4 weight, a second rounding)."""
        stored = _Source(self.ck, module, self.group_size, part="uk_t")
        if stored.kind == "int4":
            codes, scales = stored.arrays()
            return PackedMatrix.from_arrays("int4", codes.reshape(heads, r, -1), scales.reshape(heads, r, -1),
                                            self.group_size)
        f = src.rows(0, 0, src.shape[0]).reshape(heads, dn + dv, r)[:, :dn]
        return self._note("self_attn.kv_b_proj", PackedMatrix.quantize(np.ascontiguousarray(f.transpose(0, 2, 1)),
                                                                      "int4", self.group_size))


def _module(name: str) -> str:
    if not name.endswith(".weight"):
        raise ValueError(f"{name!r} is not a weight name (<module>.weight)")
    return name[: -len(".weight")]


def mlp_prefix(name: str) -> str | None:
    """"model.layers.0.mlp" for any of that MLP's gate/up/down weights (shared experts likewise), else None."""
    kind = dense_kind(name)
    return name.rsplit(".", 2)[0] if kind and kind.endswith(("gate_proj", "up_proj", "down_proj")) else None


@dataclass(frozen=True)
class MlaDims:
    """What splitting kv_b_proj into MLA's per-head halves needs: heads, the no-RoPE key width, the value width."""
    heads: int
    dn: int
    dv: int


def convert_tensors(ck: Checkpoint, name: str, fmt: str, group_size: int, mla: MlaDims | None = None):
    """The stored tensors for dense linear `name` in `fmt`, for a converted store, and the fallback reason (or
    None). An MLP's weight brings all three of its weights, in one format (DenseReader.mlp); kv_b in int4
    brings its "uk_t" part too (mla: the model's MlaDims). Large weights are quantized
    QUANTIZE_ROWS rows at a time."""
    reader = DenseReader(ck, fmt, group_size=group_size)
    prefix = mlp_prefix(name)
    if prefix:
        mats = reader.mlp(prefix)
        out = [t for m, part in zip(mats, ("gate", "up", "down")) for t in to_tensors(m, f"{prefix}.{part}_proj")]
        return out, next(iter(reader.fallbacks.values()), None)
    m = reader.linear(name)
    out = to_tensors(m, _module(name))
    if fmt == "int4" and m.fmt == "int4" and dense_kind(name) == "self_attn.kv_b_proj" and mla:
        uk_t = reader.mla_kv_b(name, mla.heads, mla.dn, mla.dv)[0]
        flat = PackedMatrix.from_arrays("int4", np.concatenate([uk_t.codes(g) for g in range(uk_t.groups)]),
                                        np.concatenate([uk_t.scales(g) for g in range(uk_t.groups)]), group_size)
        out += to_tensors(flat, _module(name), "uk_t")
    return out, next(iter(reader.fallbacks.values()), None)


assert QUANTIZE_ROWS % 128 == 0, "_Source.rows decodes fp8 in whole 128-row scale blocks"
