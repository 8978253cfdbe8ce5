"""`hybrid plan`: what fits where on a machine, and the predicted prefill and decode speed per prefetch policy.

    make_plan(PlanRequest(cfg, label, machine, fmt, context, trace, ...)) -> Plan
                                                    (pure given a trace; Plan.describe() / .to_json())

Steps: bytes of the model under this runtime's placement (hybrid.plan.perf.ModelCost: dense weights and the KV
cache on the GPUs in the compute dtype, routed experts in host RAM in `fmt`, hot-set experts on the GPUs
packed (with one decode buffer per GPU) or dequantized, as the runtime keeps them)
-> a layer split over the GPUs with the largest hot set that fits (the same capacity in every MoE
layer, as the runtime keeps it) -> hit rates and copies per token of each policy, by replaying a routing trace
through hybrid.core.policies (the engine's own classes; a synthetic K2-calibrated trace when none is given) ->
seconds per token from hybrid.plan.perf with the machine's rates. The split is hybrid.core.device_map's: the
code hybrid.load splits a device map with.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

from hybrid.profile.analysis import replay, replay_layers
from hybrid.core.config import ModelConfig
from hybrid.core.device_map import DeviceShare as GpuShare, Devices, place as place_on
from hybrid.plan.hardware import Machine
from hybrid.plan.perf import ModelCost, Rates, decode_time, prefill_time
from hybrid.core.knobs import HotSetSize, TransferBudget
from hybrid.core.placement import PlanError, dense_format_of, gib
from hybrid.core.weights import dense_tensors, numel
from hybrid.core.policies import POLICIES
from hybrid.profile.trace import Trace, TraceModel
from quant.formats import FORMAT_NAMES


@dataclass(frozen=True)
class Plan:
    model: str
    expert_format: str
    context: int
    prompt_tokens: int
    machine: Machine
    gpus: tuple[GpuShare, ...]
    experts_per_layer: int
    hot_set_request: str
    hot_set_capped: bool
    n_experts: int
    moe_layers: int
    expert_device_bytes: int
    host_store_bytes: int
    host_needed_bytes: int
    trace_source: str
    rows: tuple[dict, ...]           # one per policy: hit rates, loads, decode / prefill predictions
    assumptions: tuple[str, ...]
    moe_layer_ids: tuple[int, ...]
    hot_set_format: str = "bf16"     # "packed" | "bf16": how a resident expert is kept (resolve_hot_set_format)
    decode_buffer_bytes: int = 0     # packed: one expert in the compute dtype on each GPU, the decode target
    dense_format: str = "torch"      # the runtime's dense choice the plan's dense bytes follow (PlanRequest.dense)
    dense_formats: str = ""          # what that gives each dense linear, in words (dense_summary)
    dense_bytes: int = 0             # all non-expert bytes on the GPUs, each GPU's dense decode buffer included
    dense_buffer_bytes: int = 0      # packed dense: the largest of the GPUs' buffers they are dequantized into

    def to_json(self) -> dict:
        d = asdict(self)
        d["machine"]["gpu"] = asdict(self.machine.gpu)
        d["hot_set_share"] = self.experts_per_layer / self.n_experts
        return d

    def describe(self) -> str:
        m = self.machine
        cpu = m.rates(self.expert_format).cpu_experts
        lines = [f"plan: {self.model}, {self.expert_format} experts in host RAM, context {self.context} tokens",
                 f"machine: {m.n_gpus} x {m.gpu.name} ({gib(m.gpu.memory)}, {m.gpu.bandwidth / 1e9:.0f} GB/s, "
                 f"{m.gpu.flops / 1e12:.3g} TFLOPS, link {m.gpu.link / 1e9:.1f} GB/s); host {m.sockets} socket(s), "
                 f"{m.cores} cores, DRAM {m.dram_bandwidth / 1e9:.0f} GB/s -> CPU experts read at "
                 f"{cpu / 1e9:.0f} GB/s; "
                 f"RAM {gib(m.ram)}", "placement:"]
        for g in self.gpus:
            moe_here = sum(1 for L in self.moe_layer_ids if g.first_layer <= L <= g.last_layer)
            lines.append("  " + g.describe(moe_here, self.experts_per_layer))
        if len(self.gpus) < m.n_gpus:
            lines.append(f"  GPU {len(self.gpus)}-{m.n_gpus - 1}: unused (everything fits on fewer GPUs)")
        lines.append(f"  hot set: {self.experts_per_layer} of {self.n_experts} experts in each of {self.moe_layers} "
                     f"MoE layers ({100 * self.experts_per_layer / self.n_experts:.1f} %), "
                     f"{gib(self.expert_device_bytes)} each on the GPU ({self._form()})"
                     + (f"; capped by GPU memory (asked {self.hot_set_request})" if self.hot_set_capped else ""))
        if self.dense_format != "torch":
            per = "a" if len(self.gpus) == 1 else "one buffer per GPU, the largest"
            lines.append(f"  dense part: {self.dense_formats}, {gib(self.dense_bytes)} on the GPUs with {per} "
                         f"{gib(self.dense_buffer_bytes)} buffer each packed weight is dequantized into before its "
                         f"product (--dense {self.dense_format})")
        lines.append(f"  host: routed experts ({self.expert_format}) {gib(self.host_store_bytes)} + reserve "
                     f"{gib(m.host_reserve)} = {gib(self.host_needed_bytes)} of {gib(m.ram)} RAM")
        lines.append(f"predicted, batch 1 (routing: {self.trace_source}); decode at {self.prompt_tokens} and "
                     f"{self.context} tokens of context, prefill of {self.prompt_tokens} tokens:")
        lines.append("| policy | hot-set hits (decode) | copies/token | decode tok/s | at full context | prefill tok/s "
                     "| decode bound by | roofline |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            d = r["decode"]
            lines.append(f"| {r['policy']} | {100 * r['decode_hit_rate']:.1f} % | "
                         f"{r['decode_copies_per_token_layer'] * self.moe_layers:.2f} | "
                         f"{1 / d['seconds']:.2f} | {1 / r['decode_full_context']['seconds']:.2f} | "
                         f"{r['prefill_tokens_per_s']:.1f} | {d['binding']} ({1e3 * d['terms_s'][d['binding']]:.1f} of "
                         f"{1e3 * d['seconds']:.1f} ms) | {d['roofline_per_s']:.1f} tok/s |")
        lines.append("assumptions:")
        lines += [f"  - {a}" for a in self.assumptions]
        return "\n".join(lines)


    def _form(self) -> str:
        if self.hot_set_format == "packed":
            return (f"packed {self.expert_format}, decoded per use into a {gib(self.decode_buffer_bytes)} buffer "
                    f"per GPU")
        return "dequantized"


def host_check(cfg: ModelConfig, cost: ModelCost, m: Machine, fmt: str) -> tuple[int, int]:
    """(store bytes, bytes needed); PlanError with what would fit when RAM is too small."""
    store = cost.expert_host * cost.n_experts * cost.moe_layers
    need = store + m.host_reserve
    if need > m.ram:
        needs = {f: ModelCost.of(cfg, m.dtype_bytes, f).expert_host * cost.n_experts * cost.moe_layers + m.host_reserve
                 for f in FORMAT_NAMES}
        alt = "; ".join(f"{f} needs {gib(v)}" + (" (fits)" if v <= m.ram else "") for f, v in needs.items())
        fix = ("use a format that fits (--format)" if any(v <= m.ram for v in needs.values()) else
               f"no format fits: give the machine at least {gib(needs['int4'])} of RAM (--ram)")
        raise PlanError(f"the routed experts in {fmt} take {gib(store)} + {gib(m.host_reserve)} reserve = {gib(need)} "
                        f"of host RAM, but the machine has {gib(m.ram)}; {alt}. {fix[0].upper() + fix[1:]}")
    return store, need


def place(cost: ModelCost, m: Machine, context: int, want: int) -> tuple[list[GpuShare], int]:
    """The GPU split of hybrid.core.device_map.place (the runtime's own) on the machine's GPUs."""
    return place_on(cost, Devices(m.n_gpus, m.gpu.memory - m.gpu_reserve, m.gpu.name, m.gpu_reserve), context, want)


def hit_rates(trace: Trace, capacity: int, policies, loads_per_token: float, max_layers: int = 4) -> tuple[dict, list]:
    """({policy: replay figures} at `capacity` experts per layer, "none" = no hot set; notes). A trace with no
    decode (or no prefill) steps lends that phase its all-token figures, and says so."""
    zero = {"decode_hit_rate": 0.0, "prefill_hit_rate": 0.0, "decode_loads_per_token": 0.0,
            "prefill_loads_per_token": 0.0}
    out, notes = {"none": zero}, []
    if capacity <= 0:
        return out, notes
    frac = capacity / trace.model.n_experts
    res = replay(trace, tuple(policies), (frac,), replay_layers(trace, max_layers), loads_per_token)
    for p in policies:
        r = res[p][frac]
        row = {}
        for k in zero:
            phase = k.split("_")[0]
            if r[k] is None:
                row[k] = r["hit_rate" if "hit" in k else "loads_per_token"]
                note = (f"the trace has no {phase} steps: {phase} figures are those of all its tokens "
                        f"(e.g. an SGLang dump without forward modes)")
                if note not in notes:
                    notes.append(note)
            else:
                row[k] = r[k]
        out[p] = row
    return out, notes


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: model `cfg` (named `label`) with its routed experts in `fmt` on `machine`, with a KV
    cache for `context` tokens.

    trace: a Trace, or a function returning one (called only once the model is known to fit: a synthetic
        K2 trace takes seconds).
    hot_set: the hot-set size, as the runtime's --gpu-expert-budget (auto: all free GPU memory; bytes are all
        GPUs' together).
    prompt_tokens: prompt length of the prefill and decode predictions (capped at `context`).
    policies: prefetch policies to predict (a "none" row, no hot set, always comes first).
    transfer: what the policies may copy, as the runtime's --transfer-budget (bytes per token count copies of
        one expert as the GPUs keep it).
    assumptions: sentences printed under the plan (the machine's and the workload's).
    max_layers: MoE layers of the trace to replay, evenly spaced.
    trace_label: where the routing comes from, as the plan names it (default: the trace's source).
    hot_set_format: "auto" | "packed" | "bf16", as the runtime's --hot-set-format (auto: bf16).
    dense: the dense linears' format, as the runtime's --dense: torch (the compute dtype) | auto (the checkpoint's own: FP8
        for K2's release) | int4 | fp8 | bf16; kept packed on the GPUs and dequantized per use.
    """
    cfg: ModelConfig
    label: str
    machine: Machine
    fmt: str
    context: int
    trace: Trace | Callable[[], Trace]
    hot_set: HotSetSize = HotSetSize("auto")
    prompt_tokens: int = 4096
    policies: tuple[str, ...] = POLICIES
    transfer: TransferBudget = TransferBudget("auto")
    assumptions: tuple[str, ...] = ()
    max_layers: int = 4
    trace_label: str | None = None
    hot_set_format: str = "auto"
    dense: str = "auto"


def make_plan(req: PlanRequest) -> Plan:
    """The plan for `req` (see the module docstring): check the model and the host, place it on the GPUs,
    replay the routing, predict each policy's speed."""
    cfg, m = req.cfg, req.machine
    _check_has_experts(cfg)
    cost = ModelCost.of(cfg, m.dtype_bytes, req.fmt, hot_set_format=req.hot_set_format, dense=req.dense,
                        dense_decoded=m.dense_decoded)
    store, need = host_check(cfg, cost, m, req.fmt)
    moe = len(cfg.moe_layers)
    want = req.hot_set.experts_per_layer(cfg.n_routed_experts, cost.expert_device, moe, cost.decode_buffer * m.n_gpus)
    _check_context(cfg, req.context)
    gpus, cap = place(cost, m, req.context, want)
    trace = req.trace() if callable(req.trace) else req.trace
    _check_shape(cfg, trace)
    prompt = min(req.prompt_tokens, req.context)
    rates = m.rates(req.fmt)
    copies = req.transfer.copies_per_layer(cost.expert_device, moe)
    rates_by_policy, trace_notes = hit_rates(trace, cap, req.policies, copies, req.max_layers)
    rows = tuple(_policy_row(pol, r, cost, rates, prompt, req.context, cap)
                 for pol, r in rates_by_policy.items())
    return Plan(req.label, req.fmt, req.context, prompt, m, tuple(gpus), cap, str(req.hot_set),
                cap < min(want, cfg.n_routed_experts), cfg.n_routed_experts, len(cfg.moe_layers), cost.expert_device,
                store, need, req.trace_label or trace.source, rows,
                tuple(req.assumptions) + tuple(trace_notes) + m.notes, tuple(cfg.moe_layers),
                "packed" if cost.packed_hot_set else "bf16", cost.decode_buffer, req.dense,
                dense_summary(cfg, req.dense), sum(g.dense_bytes for g in gpus), cost.dense_buffer)


def dense_summary(cfg: ModelConfig, dense: str) -> str:
    """The format of the dense linears under `dense`, in words: "fp8, lm_head bf16" (the most common format by
    weights, then each kind of linear kept in another)."""
    by_fmt, kinds = Counter(), {}
    for name, spec in dense_tensors(cfg).items():
        fmt = dense_format_of(cfg, name, spec, dense)
        if fmt:
            by_fmt[fmt] += numel(spec)
            kinds.setdefault(name.split(".", 3)[-1].rsplit(".", 1)[0] if name.startswith("model.") else "lm_head", fmt)
    if not by_fmt:
        return "torch (compute dtype)"
    main = by_fmt.most_common(1)[0][0]
    return ", ".join([main] + [f"{k} {f}" for k, f in kinds.items() if f != main])


def _check_has_experts(cfg: ModelConfig) -> None:
    if not cfg.moe_layers:
        raise PlanError("this model has no MoE layers: there are no routed experts to offload; it is a dense "
                        "model, which this runtime does not plan")


def _check_context(cfg: ModelConfig, context: int) -> None:
    if not 0 < context <= cfg.max_position_embeddings:
        raise PlanError(f"context {context} must lie in 1..{cfg.max_position_embeddings} (max_position_embeddings)")


def _policy_row(pol: str, r: dict, cost: ModelCost, rates: Rates, prompt: int, context: int, cap: int) -> dict:
    """One policy's predictions from its replayed hit rates and copies `r` (hit_rates): decode at `prompt` and
    at `context` tokens of context, prefill of `prompt` tokens."""
    h = r["decode_hit_rate"]
    dec = decode_time(cost, rates, h, r["decode_loads_per_token"], prompt)
    full = decode_time(cost, rates, h, r["decode_loads_per_token"], context)
    pre = prefill_time(cost, rates, r["prefill_hit_rate"], r["prefill_loads_per_token"], prompt,
                       resident=cap if pol != "none" else 0)
    return {"policy": pol, "decode_hit_rate": h,
            "decode_copies_per_token_layer": r["decode_loads_per_token"],
            "prefill_hit_rate": r["prefill_hit_rate"],
            "prefill_copies_per_token_layer": r["prefill_loads_per_token"],
            "decode": dec, "decode_tokens_per_s": 1 / dec["seconds"], "decode_full_context": full,
            "prefill": pre, "prefill_tokens_per_s": prompt / pre["seconds"]}


def _check_shape(cfg: ModelConfig, trace: Trace) -> None:
    """A trace may cover a subset of the MoE layers (synthetic, or `--layers`), but the routing must match."""
    if (trace.model.n_experts, trace.model.top_k) != (cfg.n_routed_experts, cfg.num_experts_per_tok) or \
            not set(trace.model.moe_layers) <= set(cfg.moe_layers):
        TraceModel.from_config(cfg).check(trace.model, "the routing trace")

