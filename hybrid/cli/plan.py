"""`hybrid plan`: will a model run on a machine, where does each part live, and how fast will it go.

    hybrid plan --config kimi-k2 --gpus 4xA100-80GB --cpu 2xsapphire-rapids --ram 1TiB [--format int4]
                [--context 32k] [--trace TRACE] [--gpu-expert-budget auto|10%|38/layer|2GiB]
                [--hot-set-format auto|packed|bf16] [--transfer-budget auto|0.25/layer|64MiB]
                [--dense auto|torch|int4|fp8|bf16] [--json]
    hybrid plan --config MODEL_DIR --machine local ...     this machine, as `--calibrate` measured it
    hybrid plan --calibrate [--force]                       measure this machine (about a minute; --force: save
                                                            even when the machine was busy)
The model behind the numbers: hybrid/plan/perf.py; the presets and their sources: hybrid/plan/hardware.py.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from quant.formats import FORMAT_NAMES


SYNTH_REQUESTS = 32      # the workload the synthetic generator was calibrated on (hybrid/profile/synth.py)


def add_plan_parser(sub) -> None:
    from hybrid.cli.engine_options import add_deprecated, add_option, add_parser
    from hybrid.core.options import DENSE_CHOICES
    from hybrid.core.placement import HOT_SET_FORMATS
    from hybrid.plan.hardware import GPUS, HOSTS
    p = add_parser(sub, "plan", help="what fits where, and predicted prefill/decode tokens/s on given hardware",
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="kimi-k2", help="kimi-k2 | deepseek-v3 | a model folder (default kimi-k2)")
    p.add_argument("--gpus", help=f"COUNTxNAME, e.g. 4xA100-80GB; names: {', '.join(GPUS)}")
    p.add_argument("--machine", choices=["local"], help="this machine as `hybrid plan --calibrate` measured it")
    p.add_argument("--cpu", help=f"[SOCKETSx]PRESET, e.g. 2xsapphire-rapids; presets: {', '.join(HOSTS)}")
    p.add_argument("--cpu-bandwidth", help="peak DRAM bandwidth of all sockets, e.g. 600GB/s (overrides --cpu)")
    p.add_argument("--sockets", type=int, help="CPU sockets (default: from --cpu, else 1)")
    p.add_argument("--cpu-cores", type=int, help="cores of all sockets (default: from --cpu, else 64)")
    p.add_argument("--ram", default=None, help="host RAM, e.g. 1TiB (default 1TiB; local: this machine's)")
    p.add_argument("--pcie", help="host-to-GPU copy bandwidth, e.g. 25GB/s (default: from the GPU preset)")
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB (default: from the preset)")
    p.add_argument("--hbm-bandwidth", help="GPU memory bandwidth, e.g. 2TB/s (default: from the preset)")
    p.add_argument("--gpu-tflops", type=float, help="dense BF16 TFLOPS per GPU (default: from the preset)")
    p.add_argument("--format", default="int4", choices=FORMAT_NAMES, help="routed experts in host RAM")
    p.add_argument("--context", default="32k", help="tokens of KV cache to reserve, e.g. 32k (default 32k)")
    p.add_argument("--prompt-tokens", default="4096", help="prompt length for prefill and decode predictions")
    p.add_argument("--trace", type=Path, help="routing trace (hybrid profile record/import/synth); default: synthetic")
    add_option(p, "gpu_expert_budget", default="auto", note=" (bytes: all GPUs together)")
    add_deprecated(p, "--hot-set", "--gpu-expert-budget", hot_set_as_budget)
    p.add_argument("--hot-set-format", default="auto", choices=["auto", *HOT_SET_FORMATS],
                   help="hot experts kept packed (decoded per use) or dequantized, as the runtime's flag "
                        "(auto: bf16)")
    p.add_argument("--dense", default="auto", choices=DENSE_CHOICES,
                   help="dense (non-expert) linears' format, as the runtime's --dense: auto = the checkpoint's own "
                        "(fp8 for Kimi K2's release), kept packed on the GPU and dequantized per use; torch = kept in the "
                        "compute dtype (more memory, less traffic per product)")
    p.add_argument("--policies", default="static,lru,lfu,router", help="comma-separated prefetch policies to predict")
    add_option(p, "transfer_budget", note=" (a bare number such as 0.5 is read as 0.5/layer, with a "
                                          "deprecation warning, for one release)")
    _legacy_transfer(p)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any machine figure: dram_efficiency, numa_efficiency, hbm_efficiency, mfu, serial, "
                        "stage, moe_layer_s, dense_layer_s, token_s, gpu_reserve, host_reserve, overlap, "
                        "kernel_efficiency.int4, cpu_flops_per_core.fp8, dequantize.bf16, ... (hybrid/plan/hardware.py)")
    p.add_argument("--calibration", type=Path, help="calibration file (default ~/.cache/hybrid/calibration.json)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (and time the layers of Kimi K2 and of --config), store it, and exit")
    p.add_argument("--force", action="store_true",
                   help="with --calibrate: save the figures even when the machine was busy (other processes' load "
                        "beyond the free cores above a quarter of the calibration's threads, or the kernels under 20 %% "
                        "of the read loop); the file is marked as taken under load, and plans that use it warn")
    p.add_argument("--device", default="auto", help="with --calibrate: device to measure (auto, cpu, cuda)")
    p.add_argument("--threads", type=int, help="with --calibrate: kernel threads (default: physical cores)")
    p.add_argument("--pool-gib", type=float, default=2.0, help="with --calibrate: expert pool per format (GiB)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def parse_tokens(text: str) -> int:
    """"32k" -> 32768, "4096" -> 4096."""
    t = str(text).strip().lower()
    mult = 1024 if t.endswith("k") else 1
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"cannot read token count {text!r}; write e.g. 32k or 4096") from None
    if n <= 0:
        raise ValueError(f"a token count must be positive, got {text!r}")
    return n


def build_machine(a, cfg) -> tuple:
    """(Machine, [Assumption]) from the plan command's arguments: this machine as its calibration measured it
    (--machine local) or presets (--gpus, --cpu ...), then the --gpu-memory ... and --set overrides."""
    from hybrid.plan.assumptions import FixedCosts, LocalMachine
    from hybrid.plan.calibrate import default_path
    from hybrid.plan.hardware import local_machine, with_overrides
    cal_path = a.calibration or default_path()
    if a.machine == "local":
        m, notes = local_machine(calibration_in_use(cal_path), cfg, a.format, a.dense), [LocalMachine(cal_path)]
    else:
        m, notes = _preset_machine(a, cal_path)
    over, given = _overrides(a)
    m = with_overrides(m, over)
    return m, notes + given + [FixedCosts(m.moe_layer_s, m.dense_layer_s, m.token_s)]


def calibration_in_use(cal_path):
    """The calibration at `cal_path`, with a warning on stderr when it was saved under load (`--force`)."""
    from hybrid.plan.calibrate import load_calibration
    cal = load_calibration(cal_path)
    if cal.load is not None and cal.load.under_load:
        print(f"hybrid: warning: the calibration {cal_path} was taken under load ({cal.load.busy}) and saved with "
              f"--force: its figures may be too low; rerun `hybrid plan --calibrate` when the machine is idle",
              file=sys.stderr)
    return cal


def _preset_machine(a, cal_path) -> tuple:
    """(Machine, [Assumption]) from --gpus and --cpu or --cpu-bandwidth, with the CPU side's figures from the
    calibration file when there is one, else from the development machine."""
    from hybrid.plan.assumptions import DefaultFigure, GpuPreset, HostByBandwidth, HostMemory, LayerSplit
    from hybrid.plan.hardware import DEFAULTS, Machine, parse_gpus, read_override
    if not a.gpus:
        raise ValueError("say which GPUs: --gpus 4xA100-80GB (or --machine local for this machine)")
    n, gpu = parse_gpus(a.gpus)
    sockets, host, bw, cores = _host(a)
    notes = [] if host else [HostByBandwidth(sockets, cores)]
    cpu_fields, cpu_note = _cpu_side(cal_path)
    m = Machine(gpu=gpu, n_gpus=n, ram=read_override("ram", a.ram or "1TiB"), dram_bandwidth=bw, sockets=sockets,
                cores=cores, numa_efficiency=DEFAULTS["numa_efficiency"][0] if sockets > 1 else 1.0, **cpu_fields)
    notes += [cpu_note, GpuPreset(gpu), HostMemory(sockets, bw, None if a.cpu_bandwidth else host, cores, bool(a.ram))]
    notes += [DefaultFigure(k) for k in ("dram_efficiency", "hbm_efficiency", "mfu", "gpu_reserve", "host_reserve")]
    notes += [DefaultFigure("numa_efficiency")] if sockets > 1 else []
    return m, notes + ([LayerSplit()] if n > 1 else [])


def _host(a) -> tuple:
    """(sockets, HostSpec or None, peak DRAM B/s, cores) from --cpu, --sockets, --cpu-bandwidth, --cpu-cores."""
    from hybrid.plan.hardware import parse_host, read_override
    sockets, host = parse_host(a.cpu) if a.cpu else (1, None)
    if a.sockets is not None:
        sockets = read_override("sockets", a.sockets)
    if host is None and not a.cpu_bandwidth:
        raise ValueError("say what the host's memory is: --cpu 2xsapphire-rapids (a preset) or "
                         "--cpu-bandwidth 600GB/s")
    bw = read_override("dram_bandwidth", a.cpu_bandwidth) if a.cpu_bandwidth else host.bandwidth * sockets
    cores = read_override("cores", a.cpu_cores) if a.cpu_cores is not None else \
        (host.cores * sockets if host else 64)
    return sockets, host, bw, cores


def _cpu_side(cal_path) -> tuple:
    """(Machine fields of the CPU kernels and fixed costs, CpuFigures saying where they come from)."""
    from hybrid.plan.assumptions import CpuFigures
    from hybrid.plan.hardware import DEV_CALIBRATION, from_calibration
    if Path(cal_path).is_file():
        return from_calibration(calibration_in_use(cal_path)), CpuFigures(cal_path)
    return dict(DEV_CALIBRATION), CpuFigures(None)


def _overrides(a) -> tuple:
    """({machine field: text or None}, [GivenFigure]) from --gpu-memory, --hbm-bandwidth, --gpu-tflops, --pcie,
    --ram (with --machine local) and each --set FIELD=VALUE."""
    from hybrid.plan.assumptions import GivenFigure
    over = {"gpu_memory": a.gpu_memory, "hbm_bandwidth": a.hbm_bandwidth,
            "gpu_flops": a.gpu_tflops * 1e12 if a.gpu_tflops is not None else None, "pcie": a.pcie,
            "ram": a.ram if a.machine == "local" else None}
    given = []
    for item in a.set:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants FIELD=VALUE, got {item!r}")
        over[k.strip()] = v.strip()
        given.append(GivenFigure(k.strip(), v.strip()))
    return over, given


def trace_source(a, cfg) -> tuple:
    """(a function that loads or synthesizes the routing trace to replay, Routing: where it comes from).
    Loading waits until the model is known to fit: a 32-request synthetic trace takes a few seconds."""
    from hybrid.plan.assumptions import Routing
    from hybrid.profile.synth import PRESETS, params_with, synthesize
    from hybrid.profile.trace import TraceModel, read_trace
    if a.trace:
        return (lambda: read_trace(a.trace)), Routing(a.trace, 0)
    model = PRESETS.get(str(a.config).lower()) or TraceModel.from_config(cfg)
    return ((lambda: synthesize(model, params_with(n_requests=SYNTH_REQUESTS), n_layers=min(4, len(model.moe_layers)))),
            Routing(None, SYNTH_REQUESTS))


def hot_set_as_budget(text: str) -> str:
    """The deprecated --hot-set (auto, 10% or experts per layer) in --gpu-expert-budget's grammar."""
    t = text.strip()
    return f"{t}/layer" if t.isdigit() else t


def _legacy_transfer(p) -> None:
    """plan's --transfer-budget counted copies per token per MoE layer as a bare number (0.5); for one release
    such a number still means that, with a warning, instead of bytes per token (the runtime's reading)."""
    action = next(a for a in p._actions if a.dest == "transfer_budget")
    parse = action.type

    def transfer_budget(text: str):
        t = text.strip()
        if t.replace(".", "", 1).isdigit():
            print(f"hybrid: warning: plan's --transfer-budget {t} (copies per token per MoE layer) is deprecated; "
                  f"write --transfer-budget {t}/layer (a bare number will mean bytes per token, as in generate "
                  f"and serve)", file=sys.stderr)
            t = f"{t}/layer"
        return parse(t)
    action.type = transfer_budget


def cmd_plan(a) -> int:
    if a.calibrate:
        return _calibrate(a)
    from hybrid.plan.assumptions import DenseLayers, HotSetCopies, render
    from hybrid.plan.perf import decoded_product_bytes
    from hybrid.core.placement import resolve_hot_set_format
    from hybrid.plan.known_models import resolve_config
    from hybrid.plan.planner import PlanRequest, make_plan
    cfg, label = resolve_config(a.config)
    packed = resolve_hot_set_format(a.hot_set_format, a.format) == "packed"
    m, machine_notes = build_machine(a, cfg)
    trace, routing = trace_source(a, cfg)
    e_params = cfg.moe_intermediate_size * cfg.hidden_size * 3
    copies = HotSetCopies(None if m.packed_copies else e_params / m.dequantize[a.format], packed)
    dense = DenseLayers(a.dense, m.dense_decoded, {f: decoded_product_bytes(f, m.dtype_bytes) for f in FORMAT_NAMES},
                        m.dtype_bytes)
    policies = tuple(x for x in a.policies.split(",") if x)
    plan = make_plan(PlanRequest(cfg, label, m, a.format, parse_tokens(a.context), trace,
                                 hot_set=a.gpu_expert_budget, prompt_tokens=parse_tokens(a.prompt_tokens),
                                 policies=policies, transfer=a.transfer_budget,
                                 assumptions=render([routing, *machine_notes, copies, dense]), trace_label=routing.label(),
                                 hot_set_format=a.hot_set_format, dense=a.dense))
    print(json.dumps(_finite(plan.to_json()), indent=1) if a.json else plan.describe())
    return 0


def _calibrate(a) -> int:
    """--calibrate: measure this machine (timing Kimi K2's layers, and --config's), store it."""
    from hybrid.plan.calibrate import calibrate
    from hybrid.plan.known_models import resolve_config
    configs = [resolve_config("kimi-k2")[0]]
    if str(a.config).lower() != "kimi-k2":
        configs.append(resolve_config(a.config)[0])
    path = calibrate(a.calibration, device=a.device, threads=a.threads, pool_gib=a.pool_gib, configs=configs,
                     force=a.force, log=lambda s: print(s, file=sys.stderr))
    print(f"calibration stored in {path}; plan this machine with `hybrid plan --config MODEL --machine local`")
    return 0


def _finite(x):
    """JSON has no inf: a roofline no resource binds becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
