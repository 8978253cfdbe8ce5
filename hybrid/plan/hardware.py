"""Hardware for `hybrid plan`: GPU and host-memory presets with their sources, and the Machine a plan runs on.

Datasheet figures are peaks; the planner multiplies them by efficiencies, and the efficiencies of the CPU
side come from measurement (`hybrid plan --calibrate` on the user's machine, else this project's own
development machine, recorded below). Every number can be overridden on the command line.

Traps in vendor figures: NVIDIA prints A100/H100/H200 BF16 throughput *with sparsity* (dense is half), and
GeForce cards run BF16 with FP32 accumulate at half the FP16-accumulate rate. All FLOP/s here are dense BF16
with FP32 accumulate.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from hybrid.plan.calibration import Calibration
from hybrid.plan.perf import Rates, device_decode_rate
from hybrid.core.placement import PlanError, parse_size
from quant.formats import FORMAT_NAMES

GB, GIB = 1e9, 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory: int            # bytes
    bandwidth: float       # B/s, datasheet
    flops: float           # dense BF16, FP32 accumulate, FLOP/s
    link: float            # host-to-device B/s reached by pinned copies
    source: str


_NV_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_NV_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (BF16 1,979 TFLOPS is with sparsity; dense is half)"
_NV_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (same GH100 compute as H100 SXM)"
_NV_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (appendix A)"
_PCIE4 = 25 * GB   # nvbandwidth host-to-device copy-engine figures on A100 / RTX 4090 hosts: 23.9-26.4 GB/s
_PCIE5 = 50 * GB   # PCIe 5.0 x16 peak 63 GB/s per direction; copy-engine H2D about 50-55 GB/s (assumed)

GPUS = {
    "A100-40GB": GpuSpec("A100-40GB SXM4", 40 * GIB, 1555 * GB, 312e12, _PCIE4, _NV_A100),
    "A100-40GB-PCIE": GpuSpec("A100-40GB PCIe", 40 * GIB, 1555 * GB, 312e12, _PCIE4, _NV_A100),
    "A100-80GB": GpuSpec("A100-80GB SXM4", 80 * GIB, 2039 * GB, 312e12, _PCIE4, _NV_A100),
    "A100-80GB-PCIE": GpuSpec("A100-80GB PCIe", 80 * GIB, 1935 * GB, 312e12, _PCIE4, _NV_A100),
    "H100": GpuSpec("H100 SXM5 80GB", 80 * GIB, 3350 * GB, 989.5e12, _PCIE5, _NV_H100),
    "H100-PCIE": GpuSpec("H100 PCIe 80GB", 80 * GIB, 2000 * GB, 756e12, _PCIE5, _NV_H100),
    "H200": GpuSpec("H200 SXM 141GB", 140 * GIB, 4800 * GB, 989.5e12, _PCIE5, _NV_H200),
    "RTX4090": GpuSpec("GeForce RTX 4090 24GB", 24 * GIB, 1008 * GB, 165.2e12, _PCIE4, _NV_ADA),
    "RTX6000-ADA": GpuSpec("RTX 6000 Ada 48GB", 48 * GIB, 960 * GB, 364.2e12, _PCIE4,
                           "https://www.nvidia.com/en-us/design-visualization/rtx-6000/ (BF16 derived from the "
                           "datasheet's 1,457 TFLOPS FP8 with sparsity)"),
    "L40S": GpuSpec("L40S 48GB", 48 * GIB, 864 * GB, 362.05e12, _PCIE4, "https://www.nvidia.com/en-us/data-center/l40s/"),
}
_GPU_ALIASES = {"H100-80GB": "H100", "H100-SXM": "H100", "H200-141GB": "H200", "4090": "RTX4090",
                "RTX-4090": "RTX4090", "RTX6000ADA": "RTX6000-ADA", "A100": "A100-80GB"}


@dataclass(frozen=True)
class HostSpec:
    """One CPU socket's memory system."""
    name: str
    bandwidth: float       # B/s peak per socket: channels x MT/s x 8 bytes
    cores: int             # per socket (the top SKU; override with --cpu-cores)
    source: str


def _ddr(mts: int, channels: int) -> float:
    return mts * 1e6 * 8 * channels


HOSTS = {
    "sapphire-rapids": HostSpec("Xeon Sapphire Rapids, 8 x DDR5-4800", _ddr(4800, 8), 56,
                                "Intel Xeon 4th gen: 8 DDR5-4800 channels per socket"),
    "emerald-rapids": HostSpec("Xeon Emerald Rapids, 8 x DDR5-5600", _ddr(5600, 8), 64,
                               "Intel Xeon 5th gen: 8 DDR5-5600 channels per socket"),
    "granite-rapids": HostSpec("Xeon 6900P Granite Rapids, 12 x DDR5-6400", _ddr(6400, 12), 128,
                               "https://www.servethehome.com/welcome-back-intel-xeon-6900p-reasserts-intel-server-leadership/2/"),
    "genoa": HostSpec("EPYC 9004 Genoa, 12 x DDR5-4800", _ddr(4800, 12), 96,
                      "https://lenovopress.lenovo.com/lp1852-configuring-amd-xgmi-links-on-thinksystem-sr665-v3"),
    "turin": HostSpec("EPYC 9005 Turin, 12 x DDR5-6000", _ddr(6000, 12), 128, "AMD EPYC 9005: 12 DDR5-6000 channels"),
    "milan": HostSpec("EPYC 7003 Milan, 8 x DDR4-3200", _ddr(3200, 8), 64,
                      "AMD EPYC 7003: 8 DDR4-3200 channels (no AVX-512: the kernels fall back to plain Numba)"),
    "desktop-ddr5": HostSpec("desktop, 2 x DDR5-5600", _ddr(5600, 2), 16, "2 channels x 5600 MT/s x 8 bytes"),
    "desktop-ddr4": HostSpec("desktop, 2 x DDR4-3200", _ddr(3200, 2), 16, "2 channels x 3200 MT/s x 8 bytes"),
}

# What `hybrid plan --calibrate` measured on this project's development machine (AMD EPYC, AVX-512 VNNI, 2
# threads, 2026-11-29; BENCHMARKS.md): used for the CPU side when the user has not calibrated their own.
DEV_CALIBRATION = {
    "kernel_efficiency": {"int4": 0.79, "fp8": 0.73, "bf16": 0.87},
    "cpu_flops_per_core": {"int4": 290e9, "fp8": 145e9, "bf16": 133e9},
    "stage": 17.6e9,             # staging_rates(): memcpy into a staging buffer, one thread
    # fixed costs: measure_overheads with dense="torch", 2026-11-30, mean of two runs (BENCHMARKS.md, fixed
    # costs before/after): torch modules, the closest this CPU gets to a GPU's host side (a GPU with packed dense
    # layers adds a few dequantization ops per linear: not measured); the CPU kernels' packed dense path costs
    # more per layer on tiny weights and is not what a GPU plan runs. `--calibrate` measures the local engine
    # as it runs (dense auto).
    "token_s": 46e-6, "dense_layer_s": 244e-6, "moe_layer_s": 517e-6,
}

DEFAULTS = {
    "dram_efficiency": (0.80, "STREAM on 2-socket EPYC (Azure HBv3 / HBv4) reaches 81-85 % of peak; "
                              "https://learn.microsoft.com/en-us/azure/high-performance-computing/performance-benchmarking/stream-benchmark"),
    "numa_efficiency": (0.61, "2 sockets, experts not NUMA-placed (this runtime): KTransformers reports up to 63 % "
                              "faster decode once placement is NUMA-aware (https://lmsys.org/blog/2025-10-22-KTransformers)"),
    "hbm_efficiency": (0.80, "assumed: batch-1 matrix-vector products reach ~80 % of HBM peak (not measured: no GPU)"),
    "mfu": (0.50, "assumed: prefill matmuls reach 50 % of dense BF16 peak (not measured: no GPU)"),
    "gpu_reserve": (2 * GIB, "assumed per GPU: CUDA context, activations, allocator slack"),
    "host_reserve": (16 * GIB, "assumed: OS, Python, page tables, pinned staging buffers"),
}


@dataclass(frozen=True)
class Machine:
    """Where a plan runs. `gpu` repeated `n_gpus` times; host: `sockets` x `host` (or a measured bandwidth)."""
    gpu: GpuSpec
    n_gpus: int
    ram: int
    dram_bandwidth: float                  # B/s, all sockets, peak (or measured when calibrated locally)
    sockets: int
    cores: int                             # all sockets
    kernel_efficiency: dict
    cpu_flops_per_core: dict
    stage: float                           # B/s of staging a packed expert in pinned host memory
    dequantize: dict = field(default_factory=lambda: dict.fromkeys(FORMAT_NAMES, math.inf))
    packed_copies: bool = True             # packed bytes cross the link, decoded on the GPU (expert_copy.py)
    decode: dict = field(default_factory=dict)   # params/s of decoding a packed hot expert per use, by format;
                                           # absent: the torch decoder's memory traffic at HBM speed
    dram_efficiency: float = DEFAULTS["dram_efficiency"][0]
    numa_efficiency: float = 1.0
    hbm_efficiency: float = DEFAULTS["hbm_efficiency"][0]
    mfu: float = DEFAULTS["mfu"][0]
    token_s: float = DEV_CALIBRATION["token_s"]
    dense_layer_s: float = DEV_CALIBRATION["dense_layer_s"]
    moe_layer_s: float = DEV_CALIBRATION["moe_layer_s"]
    overlap: bool = True                   # hot-set copies on a side stream (CUDA)
    dense_decoded: bool = True             # packed dense linears dequantized per use (CUDA), else read packed by
                                           # the CPU kernels (the CPU as the device)
    serial: float = 0.0                    # unhidden share of the shorter of device / CPU work (perf.join)
    attn_rate: float | None = None         # B/s of attention layers, measured on modules; None: HBM x efficiency
    ffn_rate: float | None = None          # B/s of the shared expert / hot-set experts
    dense_rate: float | None = None        # B/s of a dense layer's MLP
    dtype_bytes: int = 2
    gpu_reserve: int = int(DEFAULTS["gpu_reserve"][0])
    host_reserve: int = int(DEFAULTS["host_reserve"][0])
    notes: tuple[str, ...] = field(default=())

    def rates(self, fmt: str) -> Rates:
        cpu_bw = self.dram_bandwidth * self.dram_efficiency * self.numa_efficiency * self.kernel_efficiency[fmt]
        return Rates(hbm=self.gpu.bandwidth * self.hbm_efficiency, cpu_experts=cpu_bw, link=self.gpu.link,
                     dequantize=self.dequantize[fmt], stage=self.stage, packed_copies=self.packed_copies,
                     decode=self.decode.get(fmt) or device_decode_rate(fmt, self.dtype_bytes,
                                                                       self.gpu.bandwidth * self.hbm_efficiency),
                     device_flops=self.gpu.flops * self.mfu,
                     cpu_flops=self.cpu_flops_per_core[fmt] * self.cores, token_s=self.token_s,
                     dense_layer_s=self.dense_layer_s, moe_layer_s=self.moe_layer_s, overlap=self.overlap,
                     serial=self.serial, attn=self.attn_rate, ffn=self.ffn_rate, dense=self.dense_rate)


_COUNTED = re.compile(r"\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9_.-]+)\s*")     # "[COUNTx]NAME", as in 4xA100-80GB


def parse_gpus(text: str) -> tuple[int, GpuSpec]:
    """"4xA100-80GB" -> (4, spec); "RTX4090" -> (1, spec)."""
    m = _COUNTED.fullmatch(text or "")
    if not m:
        raise ValueError(f"cannot read --gpus {text!r}; write e.g. 4xA100-80GB or RTX4090")
    n = int(m.group(1) or 1)
    key = m.group(2).upper().replace("_", "-")
    key = _GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown GPU {m.group(2)!r}; known: {', '.join(GPUS)}. For another GPU pick the closest "
                         f"and override --gpu-memory, --hbm-bandwidth, --gpu-tflops and --pcie")
    if n < 1:
        raise ValueError(f"--gpus needs at least one GPU, got {text!r}")
    return n, GPUS[key]


def parse_host(text: str) -> tuple[int, HostSpec]:
    """"2xsapphire-rapids" -> (2, spec)."""
    m = _COUNTED.fullmatch(text or "")
    key = m.group(2).lower() if m else ""
    if not m or key not in HOSTS:
        raise ValueError(f"unknown CPU preset {text!r}; known: {', '.join(HOSTS)} (prefix 2x for two sockets), "
                         f"or give --cpu-bandwidth directly")
    n = int(m.group(1) or 1)
    if not 1 <= n <= 8:
        raise ValueError(f"socket count must lie in 1..8, got {n}")
    return n, HOSTS[key]


def parse_rate(text: str | float) -> float:
    """"600GB/s", "25 GB/s", "1.5TB/s", "6e11", 6e11 -> bytes per second."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*(?:([kKmMgGtT]i?)?[bB](?:/s|ps)?)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read bandwidth {text!r}; write e.g. 600GB/s or 25GB/s")
    unit = (m.group(2) or "").lower()
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return float(m.group(1)) * mult


def from_calibration(cal: Calibration) -> dict:
    """The CPU-side efficiencies and fixed costs a calibration measured, as Machine fields (formats it did
    not measure keep the development machine's figures)."""
    f, o = cal.formats, cal.overheads

    def pick(key: str, dev_key: str, scale: float = 1.0) -> dict:
        return {fmt: getattr(f[fmt], key) * scale if fmt in f else v for fmt, v in DEV_CALIBRATION[dev_key].items()}
    return {"kernel_efficiency": pick("kernel_efficiency", "kernel_efficiency"),
            "cpu_flops_per_core": pick("prefill_gflops_per_thread", "cpu_flops_per_core", 1e9),
            "stage": cal.device.stage_gbs * GB,
            "token_s": o.token_s, "dense_layer_s": o.dense_layer_s, "moe_layer_s": o.moe_layer_s}


def local_machine(cal: Calibration, cfg=None, fmt: str | None = None, dense: str = "auto") -> Machine:
    """This machine as its calibration measured it. With a CUDA device the GPU is that device as measured;
    on the CPU stand-in the "GPU" is torch on the same cores. With `cfg`, the device rates of its attention,
    shared-expert and dense layers come from the calibration's timings of modules of that shape, if any;
    with `fmt`, the calibration must have measured that expert format. `dense` (the runtime's choice): on the
    CPU stand-in packed dense linears run on the CPU kernels, so their rate is the kernels' measured decode
    rate for that format (the module timings are of torch float modules)."""
    from hybrid.plan.calibrate_device import modules_key
    dv = cal.device
    cuda = dv.cuda
    measured = sorted(cal.formats)
    if fmt is not None and fmt not in measured:
        raise ValueError(f"the calibration measured the {', '.join(measured)} kernels, not {fmt}: run "
                         f"`hybrid plan --calibrate` again (it measures all three) or plan with --format {measured[0]}")
    gpu = GpuSpec(f"{dv.device} ({dv.dtype}, measured)", dv.memory_bytes or cal.ram_bytes,
                  dv.matvec_gbs * GB, dv.matmul_gflops * 1e9, dv.link_gbs * GB,   # stand-in: the float copy it makes
                  "hybrid plan --calibrate " + cal.created)
    threads = cal.threads
    fields = from_calibration(cal)
    if not cuda:      # the stand-in copies the packed bytes (a memcpy) and decodes them with Numba on the same
        # cores: at load (bf16 hot set) or at each use (packed hot set)
        rates = {k: cal.formats[k].dequantize_params_per_s for k in measured}
        fields.update(stage=math.inf, packed_copies=True, dequantize=rates, decode=rates, dense_decoded=False)
    notes = [f"measured on {cal.cpu} ({threads} threads), {cal.created}",
             "device side = torch on " + dv.device + ("" if cuda else " standing in for the GPU: it shares "
                                                          "cores and memory with the CPU experts")]
    mod = cal.modules.get(modules_key(cfg, dv.dtype)) if cfg is not None else None
    kernels = None if cuda or cfg is None else _dense_kernel_format(cfg, dense)
    if kernels:
        rate = cal.read_gbs * fields["kernel_efficiency"][kernels] * GB
        fields.update(attn_rate=rate, ffn_rate=rate, dense_rate=rate)
        notes.append(f"dense linears ({kernels}) run on the CPU kernels at their measured {kernels} decode rate, "
                     f"{rate / GB:.1f} GB/s (--dense {dense})")
    elif mod:
        fields.update(attn_rate=mod.attn_gbs * GB, ffn_rate=mod.shared_gbs * GB,
                      dense_rate=(mod.dense_gbs if mod.dense_gbs is not None else dv.matvec_gbs) * GB)
        notes.append(f"device rates of this model's layers measured on modules of its shape: attention "
                     f"{mod.attn_gbs:.1f}, shared expert {mod.shared_gbs:.1f} GB/s")
    elif cfg is not None:
        notes.append(f"layers of this shape were not timed: device rates = matrix-vector {dv.matvec_gbs:.1f} GB/s "
                     f"(run `hybrid plan --calibrate --config MODEL` to time them)")
    serial = cal.serial if cal.serial is not None else 0.0 if cuda else 1.0
    notes.append(f"device and CPU-expert work overlap with serial fraction {serial:.2f}"
                 + (" (measured)" if cal.serial is not None else " (not measured)"))
    return Machine(gpu=gpu, n_gpus=1, ram=cal.ram_bytes, dram_bandwidth=cal.read_gbs * GB,
                   sockets=1, cores=threads, dram_efficiency=1.0, numa_efficiency=1.0, hbm_efficiency=1.0,
                   mfu=1.0, overlap=cuda, serial=serial,
                   dtype_bytes=dv.dtype_bytes, gpu_reserve=0, host_reserve=0, notes=tuple(notes), **fields)


def _dense_kernel_format(cfg, dense: str) -> str | None:
    """The format the CPU kernels read the dense layers' linears in under `dense` (that of an o_proj), None
    for torch modules."""
    from hybrid.core.placement import dense_format_of
    from hybrid.core.weights import dense_tensors
    name = f"model.layers.{cfg.num_hidden_layers - 1}.self_attn.o_proj.weight"
    return dense_format_of(cfg, name, dense_tensors(cfg)[name], dense)


# What `--set FIELD=VALUE` may change, how to read the value and what range it must lie in.
# kind: "rate" (B/s, e.g. 25GB/s), "size" (bytes, e.g. 2GiB), "float", "int", "bool"; per-format fields take
# FIELD.FORMAT=VALUE (kernel_efficiency.int4=0.6).
OVERRIDES = {
    "ram": ("size", 1, None), "dram_bandwidth": ("rate", 1, None), "sockets": ("int", 1, 8), "cores": ("int", 1, None),
    "n_gpus": ("int", 1, 64), "dram_efficiency": ("float", 1e-3, 1), "numa_efficiency": ("float", 1e-3, 1),
    "hbm_efficiency": ("float", 1e-3, 1), "mfu": ("float", 1e-3, 1), "token_s": ("float", 0, None),
    "dense_layer_s": ("float", 0, None), "moe_layer_s": ("float", 0, None), "overlap": ("bool", None, None),
    "serial": ("float", 0, 1), "attn_rate": ("rate", 1, None), "ffn_rate": ("rate", 1, None),
    "dense_rate": ("rate", 1, None), "stage": ("rate", 1, None), "gpu_reserve": ("size", 0, None),
    "host_reserve": ("size", 0, None), "kernel_efficiency": ("float", 1e-3, 1),
    "cpu_flops_per_core": ("float", 1, None), "dequantize": ("float", 1, None), "decode": ("float", 1, None),
    "gpu_memory": ("size", 1, None), "hbm_bandwidth": ("rate", 1, None), "gpu_flops": ("float", 1, None),
    "pcie": ("rate", 1, None), "dense_decoded": ("bool", None, None),
}
_PER_FORMAT = ("kernel_efficiency", "cpu_flops_per_core", "dequantize", "decode")
_GPU_FIELDS = {"gpu_memory": "memory", "hbm_bandwidth": "bandwidth", "gpu_flops": "flops", "pcie": "link"}


def read_override(key: str, text) -> object:
    """One --set value, read and range-checked; ValueError naming the field and its range otherwise."""
    field_name = key.split(".", 1)[0]
    if field_name not in OVERRIDES:
        raise ValueError(f"unknown machine field {key!r}; known: {', '.join(OVERRIDES)} "
                         f"(per format: {', '.join(f + '.int4' for f in _PER_FORMAT)})")
    kind, lo, hi = OVERRIDES[field_name]
    if isinstance(text, (int, float, bool)) and not isinstance(text, str):
        v = text
    elif kind == "bool":
        if str(text).lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} wants true or false, got {text!r}")
        return str(text).lower() in ("true", "1")
    else:
        try:
            v = {"rate": parse_rate, "size": parse_size, "float": float, "int": int}[kind](text)
        except (TypeError, ValueError):
            raise ValueError(f"{key} wants a {'number' if kind in ('float', 'int') else kind}, got {text!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ValueError(f"{key} must lie in {span}, got {text!r}")
    return int(v) if kind in ("int", "size") else v


def with_overrides(m: Machine, overrides: dict) -> Machine:
    """Machine with fields replaced: {"dram_efficiency": 0.7, "kernel_efficiency.int4": "0.6", "pcie": "25GB/s"};
    values are read with read_override (None = keep)."""
    kv, gpu_kv = {}, {}
    for key, text in overrides.items():
        if text is None:
            continue
        v = read_override(key, text)
        name, _, fmt = key.partition(".")
        if name in _GPU_FIELDS:
            gpu_kv[_GPU_FIELDS[name]] = v
        elif name in _PER_FORMAT:
            if fmt not in FORMAT_NAMES:
                raise ValueError(f"{name} is per format: write {name}.int4=..., {name}.fp8=... or {name}.bf16=...")
            kv[name] = {**kv.get(name, getattr(m, name)), fmt: v}
        else:
            kv[name] = v
    if gpu_kv:
        kv["gpu"] = replace(m.gpu, **gpu_kv)
    out = replace(m, **kv)
    if out.gpu_reserve >= out.gpu.memory:
        raise ValueError(f"gpu_reserve ({out.gpu_reserve / GIB:.2f} GiB) must be smaller than the GPU's memory "
                         f"({out.gpu.memory / GIB:.2f} GiB)")
    return out


__all__ = ["GPUS", "HOSTS", "DEFAULTS", "DEV_CALIBRATION", "OVERRIDES", "GpuSpec", "HostSpec", "Machine",
           "PlanError", "parse_gpus", "parse_host", "parse_rate", "read_override", "from_calibration",
           "local_machine", "with_overrides"]
