"""Dense (non-expert) layers in their stored format: which modules the model is built with.

    dense="torch"          float nn.Linear / MLP / KVUp in the compute dtype (the reference; what the oracle
                           tests compare, and the only choice with experts="torch")
    dense="auto"           the checkpoint's own format: FP8 for the official release (lm_head: bf16, as stored)
    dense="int4|fp8|bf16"  that format for every dense linear (quantized at load for a small checkpoint; a
                           store converted with `hybrid-quant convert --dense X` holds X already)
The dense linears are quant.dense.DENSE_LINEARS: q_a/q_b (or q), kv_a, kv_b, o_proj, the shared experts,
the dense MLPs, lm_head. Norms, the router and the embeddings stay float (the embeddings in the checkpoint's
dtype; a lookup converts only the rows it takes).

A DenseModules object is the factory the model is built with (MLA/MLP's `linear=` and `kv_up=`, the MLPs,
lm_head). Where weights stay packed:
- CpuDense (the CPU is the device): PackedLinear / PackedMLP of cpu_experts on the engine's RowPool, the
  same threads as the routed experts, called synchronously: on a CPU-only machine the dense part and the
  experts take turns on the cores instead of competing for them. MLA's absorbed decode runs kv_b's two
  halves per head as grouped products (W_UK^T, W_UV). One exception, for speed: a bf16-compute product of
  GEMM_TOKENS or more tokens (a prefill chunk, or a step of that many sequences) with an FP8 or BF16 weight
  widens the weight into a reused bf16 buffer (FP8: cpu_experts.fp8.to_bf16_rows on the pool, 2.6 Gparam/s
  here, bit-identical to decode.py's fp8_into; BF16: a copy) and runs torch's GEMM (AVX512-BF16 dot products:
  950 GFLOP/s on this 2-core host against the FP8/BF16 kernels' float32 FMAs, ~270). INT4 stays on its int8
  (VNNI) kernel (~600 GFLOP/s); float32 compute always runs the kernels.
- DeviceDense (CUDA): codes and scales stay on the device, each weight is dequantized into one reused
  buffer per device right before its product (FP8 dense: about half of bf16's device memory for K2).
Packed modules are filled by the loader through fill(reader, name) with a quant.dense.DenseReader.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpu_experts import PackedLinear, PackedMLP, RowPool
from cpu_experts import fp8 as fp8_kernels
from gpu_attn import MLP
from gpu_attn.mla import KVUp
from hybrid.runtime.decode import decode_into
from quant.dense import DenseReader
from quant.packed import PackedMatrix

class PackedModule(nn.Module):
    """A module whose weights come from a DenseReader (not from set_tensor): fill() once, at load."""

    def fill(self, reader: DenseReader, name: str) -> None:
        raise NotImplementedError


class DenseModules:
    """The torch reference: float modules whose weights the loader sets tensor by tensor."""
    packed = False

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def mlp(self, hidden: int, inter: int) -> nn.Module:
        return MLP(hidden, inter)

    def kv_up(self, r: int, nh: int, dn: int, dv: int) -> nn.Module:
        return KVUp(r, nh, dn, dv)


# ---- the CPU as the device ----------------------------------------------------------------------------
GEMM_TOKENS = 64         # CpuDense: a bf16 product of this many tokens or more runs as dequantize + torch GEMM


class Scratch:
    """One reused buffer of `dtype` values on `device`, grown to the largest request (decoded weights)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._buf = torch.empty(0, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held now (the largest request so far)."""
        return self._buf.numel() * self._buf.element_size()

    def take(self, n: int) -> torch.Tensor:
        """n values, valid until the next take()."""
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=self.dtype, device=self.device)
        return self._buf[:n]


class Decodable:
    """A one-group PackedMatrix's codes and scales as torch tensors on `device` (no copy on the CPU), and its
    weight [rows, cols] decoded into a Scratch buffer on demand (hybrid/runtime/decode.py)."""

    def __init__(self, m: PackedMatrix, device: torch.device):
        self.fmt, self.group_size, self.rows, self.cols = m.fmt, m.group_size, m.rows, m.cols
        self.codes = _to(m.codes(0), device)
        self.scales = None if m.scales(0) is None else _to(m.scales(0), device)

    def weight(self, scratch: Scratch) -> torch.Tensor:
        w = scratch.take(self.rows * self.cols).view(self.rows, self.cols)
        return decode_into(self.fmt, self.codes, self.scales, self.group_size, w)


class Widened(Decodable):
    """An FP8 weight on the CPU, widened to bf16 by the pool's threads (cpu_experts.fp8.to_bf16_rows)."""

    def __init__(self, m: PackedMatrix, pool: RowPool):
        super().__init__(m, torch.device("cpu"))
        self.pool = pool

    def weight(self, scratch: Scratch) -> torch.Tensor:
        w = scratch.take(self.rows * self.cols).view(self.rows, self.cols)
        bits = w.view(torch.int16).numpy().view(np.uint16)
        self.pool.run(fp8_kernels.to_bf16_rows, (self.codes.numpy(), self.scales.numpy(), bits), self.rows)
        return w


class CpuDense(DenseModules):
    packed = True

    def __init__(self, pool: RowPool, activations: str = "auto"):
        self.pool, self.activations = pool, activations
        self.scratch = Scratch(torch.device("cpu"), torch.bfloat16)

    def gemm_form(self, m: PackedMatrix) -> Decodable | None:
        """What a prefill GEMM widens to bf16: FP8 weights on the pool, BF16 ones by a copy; None for INT4, which
        stays on its int8 (VNNI) kernel (widened at 1.6 Gparam/s + the GEMM, it measured no faster)."""
        if m.fmt == "int4":
            return None
        return Decodable(m, torch.device("cpu")) if m.fmt == "bf16" else Widened(m, self.pool)

    def gemm(self, x: torch.Tensor, w: Decodable | None) -> bool:
        """Whether the product of x with w runs as widen + torch GEMM (see the module docstring)."""
        return w is not None and x.dtype == torch.bfloat16 and x.shape[0] >= GEMM_TOKENS

    def linear(self, in_features, out_features):
        return CpuLinear(in_features, out_features, self)

    def mlp(self, hidden, inter):
        return CpuMLP(hidden, self)

    def kv_up(self, r, nh, dn, dv):
        return CpuKVUp(r, nh, dn, dv, self)


def _run(op, x: torch.Tensor, out_shape: tuple, pool: RowPool) -> torch.Tensor:
    """op.run on x's float32 values into a new float32 tensor (returned in x's dtype)."""
    out = torch.empty(out_shape, dtype=torch.float32)
    op.run(x.detach().to(torch.float32).numpy(), out.numpy(), pool)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


class CpuLinear(PackedModule):
    """y = x W^T through cpu_experts.PackedLinear. x [T, K] on the CPU."""

    def __init__(self, in_features: int, out_features: int, dense: CpuDense):
        super().__init__()
        self.in_features, self.out_features, self._dense = in_features, out_features, dense
        self.op: PackedLinear | None = None

    def fill(self, reader, name):
        m = reader.linear(name + ".weight")
        self.op, self.dec = PackedLinear(m, self._dense.activations), self._dense.gemm_form(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense.gemm(x, self.dec):
            return F.linear(x, self.dec.weight(self._dense.scratch))
        return _run(self.op, x, (x.shape[0], self.out_features), self._dense.pool)


class CpuMLP(PackedModule):
    """down(silu(gate x) * up x) through cpu_experts.PackedMLP: two pool calls."""

    def __init__(self, hidden: int, dense: CpuDense):
        super().__init__()
        self.hidden, self._dense = hidden, dense
        self.op: PackedMLP | None = None

    def fill(self, reader, name):
        mats = reader.mlp(name)
        self.op = PackedMLP(*mats, activations=self._dense.activations)
        self.dec = tuple(self._dense.gemm_form(m) for m in mats)        # gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self._dense
        if all(d.gemm(x, w) for w in self.dec):
            gate, up, down = self.dec
            h = F.silu(F.linear(x, gate.weight(d.scratch)))
            h = h * F.linear(x, up.weight(d.scratch))
            return F.linear(h, down.weight(d.scratch))
        return _run(self.op, x, (x.shape[0], self.hidden), d.pool)


class CpuKVUp(PackedModule):
    """kv_b_proj with the contract of gpu_attn.mla.KVUp: the expanded product and the two absorbed ones."""

    def __init__(self, r: int, nh: int, dn: int, dv: int, dense: CpuDense):
        super().__init__()
        self.r, self.nh, self.dn, self.dv, self._dense = r, nh, dn, dv, dense
        self.full = self.uk_t = self.uv = None

    def fill(self, reader, name):
        act, m = self._dense.activations, reader.linear(name + ".weight")
        self.full, self.dec = PackedLinear(m, act), self._dense.gemm_form(m)
        uk_t, uv = reader.mla_kv_b(name + ".weight", self.nh, self.dn, self.dv)
        self.uk_t, self.uv = PackedLinear(uk_t, act), PackedLinear(uv, act)

    def forward(self, c: torch.Tensor) -> torch.Tensor:                 # [S, r] -> [S, nh * (dn + dv)]
        if self._dense.gemm(c, self.dec):
            return F.linear(c, self.dec.weight(self._dense.scratch))
        return _run(self.full, c, (c.shape[0], self.nh * (self.dn + self.dv)), self._dense.pool)

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:           # [T, nh, dn] -> [nh, T, r]
        return _run(self.uk_t, q_nope, (q_nope.shape[0], self.nh, self.r), self._dense.pool).transpose(0, 1)

    def absorb_o(self, lat: torch.Tensor) -> torch.Tensor:              # [nh, T, r] -> [T, nh, dv]
        return _run(self.uv, lat.transpose(0, 1), (lat.shape[1], self.nh, self.dv), self._dense.pool)


# ---- CUDA: packed in device memory, dequantized per use -----------------------------------------------
class DeviceDense(DenseModules):
    packed = True

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.scratch = Scratch(device, dtype)

    def linear(self, in_features, out_features):
        return DeviceLinear(in_features, out_features, self)

    def mlp(self, hidden, inter):
        return MLP(hidden, inter, linear=self.linear)

    def kv_up(self, r, nh, dn, dv):
        return DeviceKVUp(r, nh, dn, dv, self)


class DeviceLinear(PackedModule):
    """y = x W^T with W kept packed (codes + scales) on the device and dequantized into a reused buffer."""

    def __init__(self, in_features: int, out_features: int, dense: DeviceDense):
        super().__init__()
        self.in_features, self.out_features, self._dense = in_features, out_features, dense
        self.dec: Decodable | None = None

    def fill(self, reader, name):
        self.load(reader.linear(name + ".weight"))

    def load(self, m: PackedMatrix) -> None:
        """Take a one-group PackedMatrix's codes and scales to the device, as they are."""
        self.dec = Decodable(m, self._dense.device)

    def weight(self) -> torch.Tensor:
        """The weight [N, K] dequantized into the device's shared buffer (valid until the next weight())."""
        return self.dec.weight(self._dense.scratch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DeviceKVUp(DeviceLinear):
    """kv_b_proj kept packed on the device; each use dequantizes it (gpu_attn.mla.KVUp's contract)."""

    def __init__(self, r: int, nh: int, dn: int, dv: int, dense: DeviceDense):
        super().__init__(r, nh * (dn + dv), dense)
        self.r, self.nh, self.dn, self.dv = r, nh, dn, dv

    def absorb_q(self, q_nope):                                      # [T, nh, dn] -> [nh, T, r]
        w = self.weight().view(self.nh, self.dn + self.dv, self.r)
        return torch.bmm(q_nope.transpose(0, 1), w[:, : self.dn])

    def absorb_o(self, lat):                                         # [nh, T, r] -> [T, nh, dv]
        w = self.weight().view(self.nh, self.dn + self.dv, self.r)
        return torch.bmm(lat, w[:, self.dn:].transpose(1, 2)).transpose(0, 1)


def _to(a, device: torch.device) -> torch.Tensor:
    if a.dtype == np.uint16:
        a = a.view(np.int16)                   # same bits; torch's uint16 support is partial
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def modules_for(dense: str, device: torch.device, dtype: torch.dtype, pool: RowPool, activations: str) -> DenseModules:
    """The factory for a `dense` choice on this device (see the module docstring)."""
    if dense == "torch":
        return DenseModules()
    if device.type == "cpu":
        return CpuDense(pool, activations)
    return DeviceDense(device, dtype)
