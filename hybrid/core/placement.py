"""Placement: what lives on the device(s), what in host RAM, and how many routed experts the hot set holds.

plan_placement() is a pure function of the config, the expert format, the context and the memory sizes;
it returns a frozen PlacementPlan that the loader applies once and `hybrid generate` prints at start-up.
With several devices (a device map) the layers are split by hybrid.core.device_map.place, the code `hybrid
plan` splits them with, over the runtime's own byte counts (DeviceBytes).
Hot-set experts are kept in one of two forms (hot_set_format): "packed", the store's own bytes (INT4 codes +
scales, FP8 codes + block scales: 23.6 MiB per K2 expert in INT4), decoded per use into one buffer per device;
or "bf16", dequantized to the compute dtype (84 MiB per K2 expert in bf16). Impossible requests (a context whose
KV cache does not fit, a store larger than RAM) raise PlanError with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from quant.formats import COMPACT_FORMATS, bytes_per_matrix
from quant.layout import SECTION_ALIGN, make_layout
from quant.packed import holds

from hybrid.core.config import ModelConfig
from hybrid.core.device_map import DeviceShare, Devices, PlanError, gib, place
from hybrid.core.knobs import HotSetSize, parse_size  # noqa: F401  (parse_size: importers of this module use it)
from hybrid.core.weights import TensorSpec, dense_tensors, device_nbytes, expert_shapes, numel


HOT_SET_FORMATS = ("packed", "bf16")   # how a resident expert is kept: store bytes, or the compute dtype
PACKABLE = COMPACT_FORMATS              # store formats a packed hot set keeps (bf16 is its own packed form)


def resolve_hot_set_format(requested: str, expert_format: str) -> str:
    """"auto" | "packed" | "bf16" for experts stored in `expert_format` -> "packed" | "bf16".

    auto: bf16. A packed hit is decoded into a buffer before its matmul (tokens stay identical to the bf16
    hot set), which moves about 5 bytes per INT4 weight through device memory: the planner predicts K2
    decode on 4 x A100 at 7.4-8.8 tok/s with a packed hot set of 202 experts per layer against 13.0 with a
    bf16 one of 56, so packed is the choice for capacity (prefill, small GPUs), not the default. packed with
    bf16 experts is an error: they have no smaller form ("torch" keeps every expert on the device, so it
    has no hot set)."""
    if requested not in ("auto", *HOT_SET_FORMATS):
        raise ValueError(f"hot_set_format={requested!r} is not one of auto, {', '.join(HOT_SET_FORMATS)}")
    if requested == "auto":
        return "bf16"
    if requested == "packed" and expert_format == "torch":
        raise ValueError("hot_set_format='packed' (--hot-set-format packed) needs a hot set, but experts='torch' "
                         "keeps every expert dequantized on the device: drop one of the two")
    if requested == "packed" and expert_format not in PACKABLE:
        raise ValueError(f"hot_set_format='packed' (--hot-set-format packed) keeps hot experts in their store "
                         f"format, which needs {' or '.join(PACKABLE)} experts, but these are {expert_format}: "
                         f"use --hot-set-format auto or bf16, or convert the model to one of them (`hybrid-quant "
                         f"convert --format {PACKABLE[0]}`)")
    return requested


def packed_expert_bytes(fmt: str, hidden: int, inter: int, group_size: int = 32) -> int:
    """Device bytes of one expert kept packed: its stored sections as laid out in the store (quant/layout.py,
    64-byte aligned), copied as one slice up to the end of its last section; the page padding stays behind."""
    lay = make_layout(fmt, hidden, inter, group_size)
    end = max(s.offset + s.nbytes for s in lay.sections.values())
    return -(-end // SECTION_ALIGN) * SECTION_ALIGN


@dataclass(frozen=True)
class DeviceBytes:
    """A model's bytes on the device side as the runtime keeps them (hybrid.core.device_map.MapCost): dense
    tensors under the dense choice (dense_tensor_bytes: packed linears, else the compute dtype, the router in
    float32), the KV cache in the compute dtype, hot-set experts in their form (hot_expert_bytes)."""
    layers: tuple[tuple[bool, int, int, int], ...]   # per layer: (is MoE, attention bytes, MLP bytes, params)
    embed_bytes: int
    head_bytes: int                                  # final norm + lm_head
    kv_bytes_per_token: int                          # per layer
    expert_device: int
    decode_buffer: int
    n_experts: int
    dense_buffers: tuple[int, ...] = ()              # per part in split order (embeddings, each layer, head): the
                                                     # largest packed linear a CUDA device dequantizes (0: none)

    @classmethod
    def of(cls, cfg: ModelConfig, dtype_bytes: int, expert_format: str, form: str, group_size: int = 32,
           dense: str = "torch", dense_decoded: bool = False) -> "DeviceBytes":
        """form: the resolved hot-set form ("packed" | "bf16"). dense: the runtime's --dense choice;
        dense_decoded: packed dense linears are dequantized per use into one buffer per device (CUDA: each
        device's buffer is its largest packed linear, dense_buffers per part), else read packed (a CPU device's
        kernels: no buffer)."""
        n = cfg.num_hidden_layers
        attn, ffn, params, bufs = [0] * n, [0] * n, [0] * n, [0] * (n + 2)
        embed = head = 0
        for name, spec in dense_tensors(cfg).items():
            nbytes = dense_tensor_bytes(cfg, name, spec, dtype_bytes, dense, group_size)
            part = int(name.split(".")[2]) + 1 if name.startswith("model.layers.") else \
                0 if name == "model.embed_tokens.weight" else n + 1
            if dense_decoded and dense_format_of(cfg, name, spec, dense, group_size):
                bufs[part] = max(bufs[part], numel(spec) * dtype_bytes)
            if 0 < part <= n:
                (ffn if ".mlp." in name else attn)[part - 1] += nbytes
                params[part - 1] += numel(spec)
            elif part == 0:
                embed += nbytes
            else:
                head += nbytes
        per_expert, buffer = hot_expert_bytes(cfg, expert_format, form, dtype_bytes, group_size)
        return cls(tuple((cfg.is_moe_layer(L), attn[L], ffn[L], params[L]) for L in range(n)), embed, head,
                   cfg.kv_cache_dim * dtype_bytes, per_expert, buffer, cfg.n_routed_experts, tuple(bufs))

    @property
    def dense_bytes(self) -> int:
        """Everything but the routed experts on one device: the tensors and the one dense decode buffer."""
        return self.embed_bytes + sum(a + f for _, a, f, _ in self.layers) + self.head_bytes + \
            max(self.dense_buffers, default=0)


@dataclass(frozen=True)
class PlacementPlan:
    device: str                 # the device, or the device map's devices joined by commas
    compute_dtype_bytes: int
    context: int
    device_memory: int          # bytes the plan may use on each device
    dense_bytes: int            # embeddings, attention, router, shared experts, dense MLPs, lm_head (all devices)
    kv_cache_bytes: int         # compressed MLA cache for `context` tokens (all devices)
    expert_device_bytes: int    # one resident routed expert on the device (packed, or in the compute dtype)
    experts_per_layer: int      # hot-set capacity of each MoE layer
    moe_layers: int
    n_routed_experts: int
    expert_format: str
    expert_host_bytes: int      # one routed expert in the host store
    host_store_bytes: int       # all routed experts in host RAM
    host_memory: int
    mmap: bool
    hot_set_format: str         # "packed" | "bf16" (resolve_hot_set_format)
    decode_buffer_bytes: int    # packed: one expert in the compute dtype, the per-use decode target (per device)
    devices: tuple[str, ...] = ()          # the device map, by name (one entry: a single device)
    shares: tuple[DeviceShare, ...] = ()   # what each device holds (hybrid.core.device_map), in layer order
    moe_layer_ids: tuple[int, ...] = ()

    @property
    def hot_set_bytes(self) -> int:
        """All devices' hot sets, each packed one with its decode buffer."""
        if not self.experts_per_layer:
            return 0
        return self.experts_per_layer * self.moe_layers * self.expert_device_bytes + \
            self.decode_buffer_bytes * max(1, sum(1 for s in self.shares if s.hot_bytes))

    def hot_set_form(self) -> str:
        """How one resident expert is kept, in words."""
        if self.hot_set_format == "packed":
            return (f"packed {self.expert_format}, {gib(self.expert_device_bytes)} each, decoded per use into one "
                    f"{gib(self.decode_buffer_bytes)} buffer{' per device' if len(self.devices) > 1 else ''}")
        return f"dequantized, {gib(self.expert_device_bytes)} each"

    @property
    def hot_set_share(self) -> float:
        return self.experts_per_layer / self.n_routed_experts if self.n_routed_experts else 0.0

    def describe(self) -> str:
        if len(self.devices) > 1:
            return self._describe_map()
        return "\n".join([
            f"placement on {self.device} (context {self.context} tokens):",
            f"  device: dense weights {gib(self.dense_bytes)} + KV cache {gib(self.kv_cache_bytes)} + hot set "
            f"{gib(self.hot_set_bytes)} ({self.experts_per_layer}/{self.n_routed_experts} experts x "
            f"{self.moe_layers} MoE layers, {self.hot_set_share:.0%}; {self.hot_set_form()}) of "
            f"{gib(self.device_memory)}",
            self._host_line(),
        ])

    def _describe_map(self) -> str:
        """One line per device of the map (DeviceShare.describe, as `hybrid plan` prints it), then the hot set."""
        lines = [f"placement on {len(self.devices)} devices, {gib(self.device_memory)} each (context "
                 f"{self.context} tokens):"]
        for s in self.shares:
            moe_here = sum(1 for L in self.moe_layer_ids if L in s.layers)
            name = f"device {s.index} ({self.devices[s.index]})"
            lines.append("  " + s.describe(moe_here, self.experts_per_layer, name))
        if len(self.shares) < len(self.devices):
            rest = self.devices[len(self.shares):]
            lines.append(f"  device {len(self.shares)}-{len(self.devices) - 1} ({', '.join(rest)}): unused "
                         f"(everything fits on fewer devices)")
        lines.append(f"  hot set: {self.experts_per_layer}/{self.n_routed_experts} experts x {self.moe_layers} MoE "
                     f"layers ({self.hot_set_share:.0%}; {self.hot_set_form()}): {gib(self.hot_set_bytes)}")
        lines.append(self._host_line())
        return "\n".join(lines)

    def _host_line(self) -> str:
        return (f"  host:   routed experts ({self.expert_format}) {gib(self.host_store_bytes)} of "
                f"{gib(self.host_memory)} RAM{' (memory-mapped)' if self.mmap else ''}")


def expert_host_bytes(cfg: ModelConfig, fmt: str, group_size: int = 32) -> int:
    return sum(bytes_per_matrix(fmt, r, c, group_size) for r, c in expert_shapes(cfg))


def dense_format_of(cfg: ModelConfig, name: str, spec: TensorSpec, dense: str, group_size: int = 32) -> str | None:
    """The format dense tensor `name` is kept in under the runtime's `dense` choice, as hybrid/runtime/dense.py
    keeps it on a CUDA device: None for a float tensor (dense="torch"; norms, the router, the embeddings), else
    "int4" | "fp8" | "bf16". The packed ones are quant.dense.DENSE_LINEARS: the tensors the release stores in
    FP8 plus lm_head (tests/plan/test_plan.py checks the two agree). auto: the checkpoint's own format (FP8 for
    the release's FP8 tensors, bf16 for the rest); a shape int4 cannot hold falls back to bf16, an MLP as a
    whole (quant.dense.DenseReader)."""
    if dense == "torch" or not (spec.fp8 or name == "lm_head.weight"):
        return None
    fmt = dense if dense != "auto" else ("fp8" if spec.fp8 and cfg.is_fp8_checkpoint else "bf16")
    dims = spec.shape if ".mlp." in name else spec.shape[1:]     # an MLP needs both its sizes, a linear its inputs
    return fmt if all(holds(fmt, d, group_size) for d in dims) else "bf16"


def dense_tensor_bytes(cfg: ModelConfig, name: str, spec: TensorSpec, dtype_bytes: int, dense: str = "torch",
                       group_size: int = 32) -> int:
    """Device bytes of one dense tensor under `dense` (dense_format_of): packed codes + scales, else the compute
    dtype (the router float32; with packed dense layers the embeddings stay bf16, a lookup converts its rows)."""
    fmt = dense_format_of(cfg, name, spec, dense, group_size)
    if fmt is not None:
        return bytes_per_matrix(fmt, *spec.shape, group_size)
    if dense != "torch" and name == "model.embed_tokens.weight":
        return numel(spec) * 2
    return device_nbytes(name, spec, dtype_bytes)


def dense_device_bytes(cfg: ModelConfig, dtype_bytes: int, dense: str = "torch", group_size: int = 32,
                       decoded: bool = True) -> int:
    """Device bytes of everything but the routed experts under `dense` (DeviceBytes.of), with the decode buffer
    of packed linears a CUDA device dequantizes (decoded). K2 (bf16 compute): 22.14 GiB with dense="torch",
    15.76 GiB with "auto" (its FP8 release; 2.19 GiB of it the buffer)."""
    return DeviceBytes.of(cfg, dtype_bytes, "bf16", "bf16", group_size, dense, decoded).dense_bytes


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int) -> int:
    return context * cfg.num_hidden_layers * cfg.kv_cache_dim * dtype_bytes


def plan_placement(cfg: ModelConfig, *, device: str, dtype_bytes: int, expert_format: str, context: int,
                   device_memory: int, host_memory: int, gpu_expert_budget: HotSetSize | int | str = 0,
                   mmap: bool = False, group_size: int = 32, hot_set_format: str = "auto",
                   devices: tuple[str, ...] = (), dense_format: str = "torch") -> PlacementPlan:
    """Decide the placement. gpu_expert_budget: a HotSetSize, or its text / an int of bytes (HotSetSize.parse:
    "2GiB" all devices together, "25%", "38/layer", "auto"); the hot set gets that much, capped by what the
    devices have left after dense weights and KV (and, packed, one decode buffer each). hot_set_format: auto |
    packed | bf16 (resolve_hot_set_format).
    devices: the device map by name (default: `device` alone), each offering device_memory bytes; the layers
    are split over them as `hybrid plan` splits them (hybrid.core.device_map.place). dense_format: the
    runtime's dense choice (DeviceBytes.of; default torch, the dense part in the compute dtype); a CUDA device
    also holds the buffer packed dense linears are dequantized into."""
    if context <= 0 or context > cfg.max_position_embeddings:
        raise PlanError(f"context {context} must lie in 1..{cfg.max_position_embeddings} (max_position_embeddings)")
    names = tuple(devices) or (device,)
    form = resolve_hot_set_format(hot_set_format, expert_format)
    moe = len(cfg.moe_layers)
    cost = DeviceBytes.of(cfg, dtype_bytes, expert_format, form, group_size, dense_format,
                          dense_decoded=names[0].startswith("cuda"))
    dense = cost.dense_bytes
    kv = kv_cache_bytes(cfg, context, dtype_bytes)
    per_expert_dev, buffer = cost.expert_device, cost.decode_buffer
    host_one = expert_host_bytes(cfg, expert_format, group_size)
    host_store = host_one * cfg.n_routed_experts * moe
    fixed = dense + kv
    if len(names) == 1 and fixed > device_memory:
        max_ctx = max(0, (device_memory - dense) // max(1, kv // context))
        raise PlanError(
            f"the device needs {gib(dense)} for dense weights + {gib(kv)} of KV cache for {context} tokens = "
            f"{gib(fixed)}, but {gib(device_memory)} is available; the most context that fits is about "
            f"{max_ctx} tokens (lower --context / max_new_tokens, or use a device with more memory)")
    if host_store > host_memory and not mmap:
        raise PlanError(
            f"the routed experts take {gib(host_store)} in {expert_format} but the host has {gib(host_memory)} "
            f"of RAM available; use a converted store (memory-mapped) or a smaller format such as int4")
    want = HotSetSize.parse(gpu_expert_budget).experts_per_layer(cfg.n_routed_experts, per_expert_dev, moe,
                                                                 buffer * len(names))
    kind = names[0].split(":")[0]
    shares, capacity = place(cost, Devices(len(names), device_memory, f"{kind} device of {gib(device_memory)}",
                                           kind="device"), context, want if moe else 0)
    return PlacementPlan(",".join(names), dtype_bytes, context, device_memory, dense, kv, per_expert_dev, capacity,
                         moe, cfg.n_routed_experts, expert_format, host_one, host_store, host_memory, mmap, form,
                         buffer, names, tuple(shares), tuple(cfg.moe_layers))


def hot_expert_bytes(cfg: ModelConfig, expert_format: str, form: str, dtype_bytes: int,
                     group_size: int = 32) -> tuple[int, int]:
    """(device bytes of one resident expert, bytes of the decode buffer) for a hot set kept in `form`
    ("packed" | "bf16", already resolved): packed keeps the stored slice and decodes into one expert's worth
    of compute-dtype weights; bf16 keeps that dequantized form per expert and needs no buffer."""
    dequantized = 3 * cfg.hidden_size * cfg.moe_intermediate_size * dtype_bytes
    if form == "packed":
        return packed_expert_bytes(expert_format, cfg.hidden_size, cfg.moe_intermediate_size, group_size), dequantized
    return dequantized, 0
