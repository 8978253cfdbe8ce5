"""The planner's performance model: seconds per decode token and per prefill chunk, from bytes, FLOPs, rates.

Everything is batch 1, one request, what `hybrid generate` and the server do. Symbols (per token, one layer):
    B_attn, B_ffn   device weight bytes of attention (q/kv projections, o_proj) and of the dense MLP or the
                    shared expert + router, in the dense format (hybrid.core.placement.dense_tensor_bytes:
                    the compute dtype with dense="torch", else the linears packed); what a decode token moves
                    through device memory for them (ModelCost.reads): the same bytes, except that a packed
                    linear a CUDA device dequantizes before each product (hybrid/runtime/dense.py DeviceDense)
                    moves P (decode_traffic + dtype) bytes: FP8 1 + 3 x 2 + 2 = 9 per weight in bf16, 4.5x
                    its bf16 form; a CPU device's kernels read it packed (its stored bytes)
    B_kv(c)         compressed KV read at context c: c * kv_cache_dim * dtype bytes
    B_host, B_dev   one routed expert in the host store (int4/fp8/bf16) and as a resident device copy: its
                    stored slice when the hot set is packed, else its weights in the compute dtype
    B_w, P          one expert's weights in the compute dtype (what a hit's matmuls read), and its parameters
    k, h            experts per token, share of them served by the device hot set (from trace replay)
    n_load          hot-set loads per token per MoE layer (from trace replay; bounded by the transfer budget)
Rates: W_hbm (device memory bandwidth reached by matrix-vector products), W_cpu = W_dram * kernel efficiency
(the CPU kernels' measured fraction of the read loop), W_link (host-to-device copies), R_deq and R_stage (host
work per copied expert: decoding, params/s, and staging, B/s), R_dec (params/s of decoding a packed hot expert on
the device for each use), F_dev / F_cpu (FLOP/s ceilings), fixed costs o_tok,
o_dense, o_moe (Python, dispatch, syncs, the CPU call; measured by `hybrid plan --calibrate`).

Decode, per token:
    dense layer:  o_dense + B_attn / W_attn + B_kv / W_hbm + B_ffn / W_dense
    MoE layer:    o_moe + B_attn / W_attn + B_kv / W_hbm + join(G, C)
                  G = (B_ffn + k h B_w) / W_ffn [+ k h P / R_dec]    shared expert + hot-set experts (device;
                                                                     the bracket when the hot set is packed)
                  C = k (1 - h) B_host / W_cpu                       missed experts on the CPU kernels
    token:        o_tok + B_head / W_hbm
    copies:       n = n_load * moe_layers experts per token: n (params / R_deq + B_host / R_stage) on the host
                  (serial: the engine waits for it), and n B / W_link on the link, B = B_host when the packed
                  bytes travel and are decoded on the device (CUDA; the decode itself, ~0.1 ms per K2 expert,
                  is left out), B = B_dev when the host decodes; a packed hot set copies its slice as it is:
                  n B_dev / R_stage on the host and n B_dev / W_link on the link, no decoding
join(G, C) = max(G, C) + s min(G, C): s = 0 when the device and the CPU run at once (CUDA: the CPU call is
submitted, the shared expert runs, then wait), s = 1 when they take turns; `hybrid plan --calibrate` measures
s (on the CPU stand-in they share cores and the memory bus: s is near 1). W_attn, W_ffn, W_dense are W_hbm
unless measured on modules of the model's shape. With overlap the link copy runs on a side stream: total =
max(compute, link) + host copy work; without: the sum.

Prefill, per chunk of T tokens starting at position s (MLA's expanded form over s + T cached tokens):
    device:  max(FLOP_dev / F_dev, bytes_dev / W_hbm) per layer; FLOP_dev = 2 T params + attention
             (2 T (s + T/2) heads (d_qk + d_v)) + the kv_b expansion of the s earlier rows
             (2 s kv_lora heads (d_nope + d_v); the T new rows are in 2 T params)
             + hot-set experts: 6 H I T k h FLOPs, D(n_hot, k h, T) B_w bytes [+ D(n_hot, k h, T) P / R_dec]
    CPU:     max(6 H I T k (1 - h) / F_cpu, D(E - n_hot, k (1 - h), T) B_host / W_cpu), where
             D(n, a, T) = n (1 - (1 - a/n)^T) distinct experts of n touched by T tokens (uniform routing)
    joined per MoE layer as for decode, plus o_moe / o_dense per layer, and per chunk o_tok + the lm_head
    of its last token. Copies: as for decode, n_load per token per MoE layer over the whole prompt.
The binding resource is the largest of: device memory bandwidth, DRAM bandwidth (CPU experts), the link and
host copies, fixed costs, device compute (prefill), CPU compute (prefill). Its roofline is tokens/s if that
resource were the only cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from quant.formats import bytes_per_matrix

from hybrid.core.config import ModelConfig
from hybrid.core.placement import (DeviceBytes, dense_format_of, dense_tensor_bytes,
                                   resolve_hot_set_format)
from hybrid.core.weights import dense_tensors, expert_shapes, numel


@dataclass(frozen=True)
class Rates:
    """What the machine does per second, and its fixed costs (seconds)."""
    hbm: float                  # W_hbm, B/s
    cpu_experts: float          # W_cpu = DRAM read bandwidth x kernel efficiency, B/s
    link: float                 # W_link, B/s
    dequantize: float           # R_deq, params/s of decoding a copied expert on the host (inf: decoded on device)
    device_flops: float         # F_dev, FLOP/s reached in prefill matmuls
    cpu_flops: float            # F_cpu, FLOP/s of the CPU expert kernels in prefill
    stage: float = math.inf     # R_stage, B/s of staging the packed bytes in pinned host memory (serial)
    decode: float = math.inf    # R_dec, params/s of decoding a packed hot expert on the device, per use
    packed_copies: bool = False # the packed bytes cross the link (CUDA), else the decoded copy does
    token_s: float = 0.0        # o_tok
    dense_layer_s: float = 0.0  # o_dense
    moe_layer_s: float = 0.0    # o_moe
    overlap: bool = True        # copies run on a side stream, beside the compute
    serial: float = 0.0         # s: how much of the shorter of G and C is not hidden behind the longer one
    attn: float | None = None   # W_attn: B/s attention layers reach (measured on modules), default W_hbm
    ffn: float | None = None    # W_ffn: B/s of the shared expert and hot-set experts, default W_hbm
    dense: float | None = None  # W_dense: B/s of the dense layers' MLP, default W_hbm

    def __post_init__(self):
        for name in ("attn", "ffn", "dense"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.hbm)


@dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one model under one placement (device dtype, expert format, dense format)."""
    layers: tuple[tuple[bool, int, int, int], ...]   # per layer: (is_moe, B_attn, B_ffn, params of both), resident
    head_bytes: int                             # final norm + lm_head (+ one embedding row)
    head_params: int                            # lm_head (what one token's logits multiply)
    embed_bytes: int                            # the whole embedding table (stored, not read per token)
    kv_bytes_per_token: int                     # per layer
    expert_host: int                            # B_host
    expert_device: int                          # B_dev: one resident expert (packed slice or compute dtype)
    expert_params: int                          # 3 H I
    top_k: int
    n_experts: int
    attn_flops_per_pair: int                    # 2 heads (d_qk + d_v): one query against one cached token
    kvb_flops_per_token: int                    # 2 kv_lora heads (d_nope + d_v): expanding one cached token
    packed_hot_set: bool = False                # hot experts stay packed, decoded per use (B_dev = stored slice)
    expert_weights: int | None = None           # B_w: one expert in the compute dtype (default B_dev)
    decode_buffer: int = 0                      # packed: the decode buffer on each GPU (one expert, B_w)
    reads: tuple[tuple[int, int], ...] | None = None   # per layer: (attention, MLP) bytes a decode token moves
                                                # through device memory (default: the resident B_attn, B_ffn)
    head_reads: int | None = None               # the same for the head (default: head_bytes)
    dense_format: str = "torch"                 # the runtime's dense choice these bytes follow
    dense_buffers: tuple[int, ...] = ()         # per part (embeddings, layers, head), as DeviceBytes: each device
                                                # of a split keeps the largest of its parts' (device_map)

    def __post_init__(self):
        if self.expert_weights is None:
            object.__setattr__(self, "expert_weights", self.expert_device)
        if self.reads is None:
            object.__setattr__(self, "reads", tuple((a, f) for _, a, f, _ in self.layers))
        if self.head_reads is None:
            object.__setattr__(self, "head_reads", self.head_bytes)

    @classmethod
    def of(cls, cfg: ModelConfig, dtype_bytes: int, expert_format: str, group_size: int = 32,
           hot_set_format: str = "auto", dense: str = "torch", dense_decoded: bool = True) -> "ModelCost":
        """`dense`: the runtime's dense choice (auto | int4 | fp8 | bf16 | torch); dense_decoded: packed dense
        linears are dequantized into a buffer before each product (a CUDA device), else the CPU kernels read
        them packed (the CPU as the device)."""
        form = resolve_hot_set_format(hot_set_format, expert_format)
        dev = DeviceBytes.of(cfg, dtype_bytes, expert_format, form, group_size, dense, dense_decoded)
        row = cfg.hidden_size * (dtype_bytes if dense == "torch" else 2)    # packed: the table stays bf16
        reads, head_read = _dense_reads(cfg, dtype_bytes, dense, group_size, dense_decoded)
        params = sum(r * c for r, c in expert_shapes(cfg))
        host = sum(bytes_per_matrix(expert_format, r, c, group_size) for r, c in expert_shapes(cfg))
        nh = cfg.num_attention_heads
        return cls(dev.layers, dev.head_bytes + row, cfg.vocab_size * cfg.hidden_size, dev.embed_bytes,
                   dev.kv_bytes_per_token, host, dev.expert_device, params, cfg.num_experts_per_tok,
                   cfg.n_routed_experts, 2 * nh * (cfg.qk_head_dim + cfg.v_head_dim),
                   2 * cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                   form == "packed", params * dtype_bytes, dev.decode_buffer, reads, head_read + row, dense,
                   dev.dense_buffers)

    @property
    def hit_decode_params(self) -> int:
        """Parameters decoded on the device for each hot-set hit (P when packed, else none)."""
        return self.expert_params if self.packed_hot_set else 0

    @property
    def moe_layers(self) -> int:
        return sum(1 for m, *_ in self.layers if m)

    @property
    def device_read_bytes(self) -> int:
        """Device weight bytes one decode token moves (no KV, no routed experts)."""
        return self.head_reads + sum(a + f for a, f in self.reads)

    @property
    def dense_buffer(self) -> int:
        """Packed dense on CUDA: the largest buffer they are dequantized into (0: none)."""
        return max(self.dense_buffers, default=0)

    @property
    def dense_bytes(self) -> int:
        """Device bytes of everything but the routed experts (the decode buffer included)."""
        return self.embed_bytes + self.head_bytes + sum(a + f for _, a, f, _ in self.layers) + self.dense_buffer


def _dense_reads(cfg: ModelConfig, dtype_bytes: int, dense: str, group_size: int,
                 decoded: bool) -> tuple[tuple[tuple[int, int], ...], int]:
    """Bytes one decode token moves through device memory for the dense part: per layer (attention, MLP), then
    the head's (final norm, lm_head). A packed linear a CUDA device dequantizes (decoded) moves its decode
    traffic and its product's read; otherwise a tensor moves its resident bytes (dense_tensor_bytes)."""
    n = cfg.num_hidden_layers
    reads, head = [[0, 0] for _ in range(n)], 0
    for name, spec in dense_tensors(cfg).items():
        if name == "model.embed_tokens.weight":
            continue
        fmt = dense_format_of(cfg, name, spec, dense, group_size)
        read = numel(spec) * decoded_product_bytes(fmt, dtype_bytes) if fmt and decoded else \
            dense_tensor_bytes(cfg, name, spec, dtype_bytes, dense, group_size)
        if name.startswith("model.layers."):
            reads[int(name.split(".")[2])][int(".mlp." in name)] += read
        else:
            head += read
    return tuple(map(tuple, reads)), head


RESOURCES = ("device memory bandwidth", "DRAM bandwidth", "host copies + link", "fixed costs",
             "device compute", "CPU compute")


def decode_time(c: ModelCost, r: Rates, hit: float, loads: float, context: int) -> dict:
    """Seconds per decode token at `context` cached tokens, with hot-set share `hit` and `loads` copies per
    token per MoE layer. Returns the total and each term (see the module docstring)."""
    kv = context * c.kv_bytes_per_token
    dev = cpu = fixed = 0.0
    total = r.token_s + c.head_reads / r.hbm
    dev += c.head_reads / r.hbm
    fixed += r.token_s
    for (moe, *_), (attn, ffn) in zip(c.layers, c.reads):
        a = attn / r.attn + kv / r.hbm
        if not moe:
            t_ffn = ffn / r.dense
            total += r.dense_layer_s + a + t_ffn
            dev, fixed = dev + a + t_ffn, fixed + r.dense_layer_s
            continue
        g = (ffn + c.top_k * hit * c.expert_weights) / r.ffn + c.top_k * hit * c.hit_decode_params / r.decode
        cc = c.top_k * (1 - hit) * c.expert_host / r.cpu_experts
        total += r.moe_layer_s + a + join(g, cc, r.serial)
        dev, cpu, fixed = dev + a + g, cpu + cc, fixed + r.moe_layer_s
    n = loads * c.moe_layers
    host_copy, link = copy_time(c, r, n)
    compute = total
    total = (max(compute, link) if r.overlap else compute + link) + host_copy
    exposed = max(0.0, link - compute) if r.overlap else link      # link time not hidden behind compute
    terms = {"device memory bandwidth": dev, "DRAM bandwidth": cpu, "host copies + link": host_copy + exposed,
             "fixed costs": fixed}
    cpu_bytes = c.moe_layers * c.top_k * (1 - hit) * c.expert_host
    return _result(total, terms, {"compute_s": compute, "host_copy_s": host_copy, "link_s": link,
                                  "kv_bytes": kv * len(c.layers), "cpu_expert_bytes": cpu_bytes})


def prefill_time(c: ModelCost, r: Rates, hit: float, loads: float, prompt: int, chunk: int = 512,
                 resident: int = 0) -> dict:
    """Seconds to prefill `prompt` tokens in chunks of `chunk` (the engine's default), hot-set share `hit` of
    the activations served by `resident` experts per layer, `loads` copies per token per MoE layer."""
    terms = dict.fromkeys(RESOURCES, 0.0)
    total = 0.0
    E, k = c.n_experts, c.top_k
    for s in range(0, prompt, chunk):
        T = min(chunk, prompt - s)
        attn_fl = c.attn_flops_per_pair * T * (s + T / 2) + c.kvb_flops_per_token * s   # new rows: in params
        kv = (s + T) * c.kv_bytes_per_token
        head = max(2 * c.head_params / r.device_flops, c.head_reads / r.hbm)   # lm_head: the chunk's last token
        total += r.token_s + head
        terms["fixed costs"] += r.token_s
        terms["device memory bandwidth"] += head
        for (moe, *_, params), (attn, ffn) in zip(c.layers, c.reads):
            dev_fl = attn_fl + 2 * T * params
            dev_bytes = attn + ffn + kv
            cpu_t = 0.0
            decode_t = 0.0
            if moe:
                dev_fl += 2 * c.expert_params * T * k * hit
                hot = distinct(resident, k * hit, T)            # each decoded once per chunk, when packed
                dev_bytes += hot * c.expert_weights
                decode_t = hot * c.hit_decode_params / r.decode
                cpu_fl = 2 * c.expert_params * T * k * (1 - hit)
                cpu_by = distinct(E - resident, k * (1 - hit), T) * c.expert_host
                cf, cb = cpu_fl / r.cpu_flops, cpu_by / r.cpu_experts
                cpu_t = max(cf, cb)
                terms["CPU compute" if cf >= cb else "DRAM bandwidth"] += cpu_t
            df, db = dev_fl / r.device_flops, dev_bytes / r.hbm
            dev_t = max(df, db)
            terms["device compute" if df >= db else "device memory bandwidth"] += dev_t
            terms["device memory bandwidth"] += decode_t
            dev_t += decode_t
            o = r.moe_layer_s if moe else r.dense_layer_s
            terms["fixed costs"] += o
            total += o + join(dev_t, cpu_t, r.serial)
    host_copy, link = copy_time(c, r, loads * c.moe_layers * prompt)
    terms["host copies + link"] = host_copy + (max(0.0, link - total) if r.overlap else link)
    total = (max(total, link) if r.overlap else total + link) + host_copy
    return _result(total, terms, {"tokens": prompt, "host_copy_s": host_copy, "link_s": link}, per=prompt)


def copy_time(c: ModelCost, r: Rates, n: float) -> tuple[float, float]:
    """(serial host seconds, link seconds) of n expert copies: host decode and staging, then the transfer."""
    if c.packed_hot_set:                 # the stored slice is staged and crosses as it is: nothing to decode
        return n * c.expert_device / r.stage, n * c.expert_device / r.link
    host = n * (c.expert_params / r.dequantize + c.expert_host / r.stage)
    return host, n * (c.expert_host if r.packed_copies else c.expert_device) / r.link


def decode_traffic(fmt: str, dtype_bytes: int) -> int:
    """Bytes of device memory traffic per weight of hybrid/runtime/decode.py's torch decoder (the packed hot set
    and packed dense layers on CUDA). INT4: the codes read twice (1 B), one byte per nibble written and read
    (2 B), the output written; FP8: the code read, the output written, then read and written by the scale
    multiply; bf16: a copy."""
    return {"int4": 3 + dtype_bytes, "fp8": 1 + 3 * dtype_bytes, "bf16": 2 + dtype_bytes}[fmt]


def decoded_product_bytes(fmt: str, dtype_bytes: int) -> int:
    """Device memory traffic per weight of a product whose packed weight is dequantized first (DeviceDense):
    the decode (decode_traffic), then the product's read of the compute-dtype weight."""
    return decode_traffic(fmt, dtype_bytes) + dtype_bytes


def device_decode_rate(fmt: str, dtype_bytes: int, hbm: float) -> float:
    """R_dec on a GPU: params/s of the torch decoder, bound by its memory traffic per weight at `hbm` B/s."""
    return hbm / decode_traffic(fmt, dtype_bytes)


def distinct(n: int, per_token: float, T: int) -> float:
    """Expected distinct experts among `n` that T tokens touch, `per_token` activations each spread evenly."""
    if n <= 0 or per_token <= 0:
        return 0.0
    return n * (1 - (1 - min(1.0, per_token / n)) ** T)


def join(g: float, c: float, serial: float) -> float:
    """Device work g and CPU work c started together: the longer, plus the unhidden part of the shorter."""
    return max(g, c) + serial * min(g, c)


def _result(total: float, terms: dict, extra: dict, per: int = 1) -> dict:
    """roofline_per_s: tokens/s if the binding resource were the only cost (`per` tokens in `total`)."""
    terms = {k: v for k, v in terms.items() if v > 0}
    binding = max(terms, key=terms.get) if terms else "fixed costs"
    return {"seconds": total, "terms_s": terms, "binding": binding,
            "roofline_per_s": per / terms[binding] if terms.get(binding) else float("inf"), **extra}
