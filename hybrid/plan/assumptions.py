"""What a plan assumes, as typed records: each names one fact the planner used (a preset and its source, a
default efficiency, a figure the user gave, a measurement, where the routing comes from). `hybrid plan` collects
them while it builds the machine; each record's describe() renders the sentence printed under the plan, and
nothing here computes a figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hybrid.plan.hardware import DEFAULTS, GpuSpec, HostSpec


def gib_or(v: float) -> str:
    """A size in whole GiB, or a plain number for a ratio: "16 GiB", "0.8"."""
    return f"{v / 2**30:.0f} GiB" if v >= 2**20 else f"{v:g}"


@dataclass(frozen=True)
class LocalMachine:
    """--machine local: this machine, as the calibration file measured it."""
    calibration: Path

    def describe(self) -> str:
        return f"machine: this one, from {self.calibration}"


@dataclass(frozen=True)
class HostByBandwidth:
    """--cpu-bandwidth without a --cpu preset: sockets and cores are the flags' or the defaults."""
    sockets: int
    cores: int

    def describe(self) -> str:
        return (f"host given by bandwidth only: {self.sockets} socket(s) (--sockets), {self.cores} cores (--cpu-cores)"
                + ("; one socket means no NUMA penalty" if self.sockets == 1 else ""))


@dataclass(frozen=True)
class CpuFigures:
    """Where the CPU kernels' efficiency, prefill rate, staging rate and fixed costs come from: the user's
    calibration file, or (None) this project's development machine."""
    calibration: Path | None

    def describe(self) -> str:
        what = "CPU kernel efficiency, prefill FLOP/s per core, host staging rate and fixed costs: "
        if self.calibration is not None:
            return what + f"measured by `hybrid plan --calibrate` ({self.calibration})"
        return what + "measured on this project's development machine (run `hybrid plan --calibrate` to use yours)"


@dataclass(frozen=True)
class GpuPreset:
    gpu: GpuSpec

    def describe(self) -> str:
        return (f"GPU: {self.gpu.name}: {self.gpu.source}; host-to-GPU copies {self.gpu.link / 1e9:.0f} GB/s "
                f"(nvbandwidth-style pinned copy figures)")


@dataclass(frozen=True)
class HostMemory:
    """The host's memory system; `preset` is None when --cpu-bandwidth gave the bandwidth."""
    sockets: int
    bandwidth: float
    preset: HostSpec | None
    cores: int
    ram_given: bool

    def describe(self) -> str:
        src = f"{self.preset.name}: {self.preset.source}" if self.preset else "given (--cpu-bandwidth)"
        return (f"host: {self.sockets} socket(s), {self.bandwidth / 1e9:.0f} GB/s peak ({src}), {self.cores} cores"
                + ("" if self.ram_given else "; RAM 1 TiB (default; --ram)"))


@dataclass(frozen=True)
class DefaultFigure:
    """A machine figure left at its default (hardware.DEFAULTS), with the default's source."""
    key: str

    def describe(self) -> str:
        value, source = DEFAULTS[self.key]
        return f"{self.key} = {gib_or(value)}: {source}"


@dataclass(frozen=True)
class LayerSplit:
    """More than one GPU: the plan splits the layers as hybrid.load(devices=...) does."""

    def describe(self) -> str:
        return ("layers are split over the GPUs in order and run in turn (batch 1), as hybrid.load(devices=...) / "
                "--devices splits them (the same code; not yet run on several GPUs)")


@dataclass(frozen=True)
class GivenFigure:
    """--set FIELD=VALUE, as the user wrote it."""
    key: str
    value: str

    def describe(self) -> str:
        return f"{self.key} = {self.value} (given)"


@dataclass(frozen=True)
class FixedCosts:
    """Host-side seconds per decode token beyond the weight reads (the machine's, after overrides)."""
    moe_layer_s: float
    dense_layer_s: float
    token_s: float

    def describe(self) -> str:
        return (f"fixed costs per decode token: {self.moe_layer_s * 1e6:.0f} us per MoE layer, "
                f"{self.dense_layer_s * 1e6:.0f} us per dense layer, {self.token_s * 1e6:.0f} us per token (host-side "
                f"Python and dispatch, measured; a faster host shortens them)")


@dataclass(frozen=True)
class Routing:
    """Where the routing replayed comes from: a recorded trace, or (`trace` None) the synthetic K2-calibrated
    workload of `requests` requests."""
    trace: Path | None
    requests: int

    def label(self) -> str:
        """The plan's short name for it: "trace PATH" or "synthetic"."""
        return f"trace {self.trace}" if self.trace is not None else "synthetic"

    def describe(self) -> str:
        source = self.label() if self.trace is not None else (
            f"synthetic, {self.requests} requests of 768 prompt + 256 new tokens, K2-calibrated concentration "
            f"(10 % of experts: 19 % of activations by global frequency, 45 % by the request's own)")
        return (f"routing: {source}; replayed through the runtime's policy classes on up to 4 MoE layers; the static "
                f"set is the trace's own top experts (in-sample: an upper bound for a profile of similar traffic)")


@dataclass(frozen=True)
class HotSetCopies:
    """How hot-set experts are kept and how a copy travels. packed: the stored bytes stay packed on the GPU and
    are decoded for each use (`decode_s` then unused). Otherwise they are kept dequantized, and a copy's
    packed bytes are decoded on the GPU (`decode_s` None) or on the host first, `decode_s` seconds per expert."""
    decode_s: float | None
    packed: bool = False

    def describe(self) -> str:
        if self.packed:
            return ("hot-set experts stay packed on the GPU (the store's codes + scales) and are decoded into one "
                    "buffer per GPU for each use, by torch elementwise ops at HBM speed (INT4 ~5, FP8 ~7 bytes of "
                    "traffic per weight in bf16; a fused kernel would need ~2.5); a copy stages the packed bytes in "
                    "pinned memory and they cross the link as they are")
        copy = ("the packed bytes are staged in pinned memory, cross the link and are decoded on the GPU"
                if self.decode_s is None else f"decoded on the host first ({self.decode_s:.2f} s per expert)")
        return f"hot-set experts are stored dequantized on the GPU (compute dtype); a copy: {copy}"


@dataclass(frozen=True)
class DenseLayers:
    """How the dense linears run: `dense` is the runtime's choice (--dense); `decoded`: dequantized into a buffer
    before each product (a CUDA device), else read packed by the CPU kernels; `traffic`: bytes of device memory
    traffic per weight by format when decoded (hybrid.plan.perf.decode_traffic plus the product's read);
    `compute_bytes`: what a weight kept in the compute dtype moves (the product's read alone)."""
    dense: str
    decoded: bool
    traffic: dict
    compute_bytes: int

    def describe(self) -> str:
        what = "the checkpoint's own format" if self.dense == "auto" else self.dense
        if self.dense == "torch":
            return "dense linears (--dense torch) kept in the compute dtype on the GPU, read once per product"
        if not self.decoded:
            return f"dense linears (--dense {self.dense}: {what}) run packed on the CPU kernels"
        per = ", ".join(f"{f} {b}" for f, b in self.traffic.items())
        return (f"dense linears (--dense {self.dense}: {what}) stay packed on the GPU and each product first "
                f"dequantizes its weight into one reused buffer with torch elementwise ops (hybrid/runtime/dense.py): "
                f"bytes of GPU memory traffic per weight {per}, where a weight kept in the compute dtype moves "
                f"{self.compute_bytes}")


Assumption = (LocalMachine | HostByBandwidth | CpuFigures | GpuPreset | HostMemory | DefaultFigure | LayerSplit
              | GivenFigure | FixedCosts | Routing | HotSetCopies | DenseLayers)


def render(assumptions) -> tuple[str, ...]:
    """The sentences printed under a plan, in order."""
    return tuple(a.describe() for a in assumptions)
