"""hybrid.load: a model folder -> a ready Engine.

Steps: check the options -> read config.json -> plan the placement -> open the checkpoint lazily and check
its tensor names against the config -> build the modules on the meta device -> fill them tensor by tensor
(dequantizing block-FP8) on the device -> build the routed-expert backend (hybrid/backends.py) ->
tokenizer if present.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from gpu_attn import YarnRope
from quant.checkpoint import Checkpoint
from quant.errors import CheckpointError

from hybrid.core.config import ModelConfig
from hybrid.runtime.engine import Engine
from hybrid.runtime.backends import build_cpu_backend, build_stores, build_torch_experts
from hybrid.runtime.model import K2Model, set_tensor
from hybrid.runtime.moe import MoE
from hybrid.core.options import RuntimeOptions
from hybrid.core.placement import PlacementPlan, parse_size, plan_placement
from hybrid.core.weights import FP32_SUFFIXES, dense_tensors, expert_tensors, is_ignored


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {str(device)!r} is not a device name; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; "
                         f"use device='cpu' (or 'auto')")
    if d.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    return d


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto', 'float32' or 'bfloat16'")
    return table[dtype]


def default_threads() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return n or os.cpu_count() or 1


def load(model_dir: str | Path, *, device: str = "auto", experts: str = "auto", gpu_expert_budget=0,
         prefetch: str = "auto", threads: int | None = None, dtype: str = "auto", placement=None,
         transfer_budget="auto", context: int | None = None, gpu_memory=None, activations: str = "auto") -> Engine:
    """Load a K2 / DeepSeek-V3 model folder and return an Engine.

    Args:
        model_dir: an HF checkpoint folder (config.json, safetensors shards; BF16 or block-FP8).
        device: "auto" (CUDA if present, else CPU), "cpu" or "cuda[:N]": where attention, router, shared
            expert, dense layers, lm_head and the expert hot set run.
        experts: routed-expert format on the CPU: "int4", "fp8", "bf16", or "auto" (the checkpoint's own:
            fp8 for a block-FP8 release, bf16 otherwise); "torch" runs them all as dequantized torch
            weights on the device (the reference path).
        gpu_expert_budget: device hot-set size: bytes (int or "2GiB") or a share of all routed experts
            ("25%"); 0 = no hot set.
        prefetch: hot-set policy: "router" (default when the budget is non-zero), "lru", "lfu", "static"
            (with placement=), or "off".
        threads: CPU threads for expert kernels and host-side torch (default: physical cores).
        dtype: device compute dtype; "auto" = bfloat16 on CUDA, float32 on CPU.
        placement: placement.json (from `hybrid profile`) for prefetch="static".
        transfer_budget: bytes per token the hot set may copy to the device ("auto": 1/16 expert per layer).
        context: tokens of KV cache the placement reserves (default min(max_position_embeddings, 32768)).
        gpu_memory: device bytes the placement may use (default: what the device has free).
        activations: INT4 kernels quantize each token's activations to int8 ("auto": VNNI dot products,
            about 1e-2 of max|y| from exact, like llama.cpp's Q4_0 x Q8_0) or keep float32 ("float": exact).
    Returns:
        Engine with forward(ids), generate(ids, ...), stats(); engine.plan is the PlacementPlan.
    Example:
        >>> eng = hybrid.load("tiny-k2", device="cpu", gpu_expert_budget="25%")
        >>> eng.generate([1, 2, 3], max_new_tokens=8)
    """
    opts = RuntimeOptions(device=device, dtype=dtype, experts=experts, gpu_expert_budget=gpu_expert_budget,
                          prefetch=prefetch, placement=placement, transfer_budget=transfer_budget,
                          threads=threads, context=context, gpu_memory=gpu_memory, activations=activations)
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise FileNotFoundError(f"{model_dir} is a file; pass the model folder that holds it")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist; make one with "
                                f"`hybrid make-tiny --out {model_dir}` or point at an HF checkpoint folder")
    cfg = ModelConfig.from_file(model_dir)
    dev = resolve_device(opts.device)
    dt = resolve_dtype(opts.dtype, dev)
    n_threads = opts.threads or default_threads()
    torch.set_num_threads(n_threads)
    manifest = store_manifest(model_dir)              # a converted store, or None for an HF checkpoint
    own = manifest["expert_format"] if manifest else ("fp8" if cfg.is_fp8_checkpoint else "bf16")
    fmt = own if opts.experts == "auto" else opts.experts
    if manifest and fmt not in (own, "torch"):
        raise ValueError(f"{model_dir} is a {own} expert store; use experts='auto' (or '{own}'), or convert the "
                         f"source again with `hybrid-quant convert --format {fmt}`")
    if manifest and manifest.get("moe_layers") != cfg.moe_layers:
        raise ValueError(f"{model_dir}: the store's MoE layers {manifest.get('moe_layers')} differ from config.json's "
                         f"{cfg.moe_layers}; the store and its config.json do not match (convert again)")
    placement = None
    if opts.prefetch == "static":
        from hybrid.core.placement_file import read_placement
        placement = read_placement(opts.placement, expect=cfg)      # read once: sizes the plan, seeds the set
    plan = _plan(cfg, opts, dev, dt, fmt, mmap=manifest is not None,
                 group_size=manifest["group_size"] if manifest else 32, placement=placement)
    with Checkpoint.open(model_dir) as ckpt:
        _check_names(cfg, ckpt, experts_in_checkpoint=manifest is None)
        model = _build_model(cfg, ckpt, dev, dt)
        stores = open_stores(model_dir, cfg) if manifest else None
        if fmt == "torch":
            backend = build_torch_experts(cfg, ckpt, dev, dt, stores)
        else:
            backend = build_cpu_backend(cfg, stores or build_stores(cfg, ckpt, fmt), opts, plan, model, dev, dt,
                                        n_threads, placement)
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.experts = backend
    info = {"experts": fmt, "experts_tier": "device" if fmt == "torch" else "cpu", "threads": n_threads,
            "model_dir": str(model_dir), "plan": plan}
    return Engine(cfg, model, backend, _tokenizer(model_dir), dev, dt, info)


def _plan(cfg: ModelConfig, opts: RuntimeOptions, dev: torch.device, dt: torch.dtype, fmt: str,
          mmap: bool = False, group_size: int = 32, placement: dict | None = None) -> PlacementPlan:
    import psutil
    host = psutil.virtual_memory().available
    if opts.gpu_memory is not None:
        dev_mem = parse_size(opts.gpu_memory)
    elif dev.type == "cuda":
        dev_mem = torch.cuda.mem_get_info(dev)[0]
    else:
        dev_mem = host
    budget = opts.gpu_expert_budget
    if placement is not None and budget in (0, "0", None):
        most = max((len(v) for v in placement.values()), default=0)
        budget = f"{100 * most / cfg.n_routed_experts}%"
    context = opts.context or min(cfg.max_position_embeddings, 32768)
    return plan_placement(cfg, device=str(dev), dtype_bytes=torch.empty(0, dtype=dt).element_size(),
                          expert_format="bf16" if fmt == "torch" else fmt, context=context,
                          device_memory=dev_mem, host_memory=host,
                          gpu_expert_budget=0 if fmt == "torch" or opts.prefetch == "off" else budget, mmap=mmap,
                          group_size=group_size)


def store_manifest(model_dir: Path) -> dict | None:
    """The manifest of a converted store; None for a plain HF folder; an error for a partial conversion."""
    from quant.convert import JOURNAL, MANIFEST
    from quant.verify import read_manifest
    if (model_dir / MANIFEST).exists() or (model_dir / "experts").is_dir() or (model_dir / JOURNAL).exists():
        return read_manifest(model_dir)      # raises "not a complete store: rerun hybrid-quant convert"
    return None


def open_stores(model_dir: Path, cfg: ModelConfig) -> dict:
    """Memory-map each MoE layer's expert file (no copy); shapes checked against config.json."""
    from quant.convert import layer_file
    from quant.store import LayerStore
    stores = {}
    for L in cfg.moe_layers:
        path = model_dir / layer_file(L)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the store; rerun `hybrid-quant convert`")
        st = LayerStore.load(path, mmap=True)
        if (st.spec.hidden, st.spec.inter, st.n_experts) != (cfg.hidden_size, cfg.moe_intermediate_size,
                                                             cfg.n_routed_experts):
            raise ValueError(f"{path} holds {st.n_experts} experts of {st.spec.hidden}x{st.spec.inter} but "
                             f"config.json says {cfg.n_routed_experts} of {cfg.hidden_size}x"
                             f"{cfg.moe_intermediate_size}; the store and its config.json do not match")
        stores[L] = st
    return stores


def _check_names(cfg: ModelConfig, ckpt: Checkpoint, experts_in_checkpoint: bool = True) -> None:
    expected = set(dense_tensors(cfg))
    for layer in cfg.moe_layers if experts_in_checkpoint else ():
        expected.update(expert_tensors(cfg, layer))
    present = set(ckpt.names)
    missing = sorted(expected - present)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{ckpt.model_dir}: tensor {missing[0]!r} is missing{' (also ' + ', '.join(missing[1:3]) + more + ')' if len(missing) > 1 else ''}; "
            f"the config.json says the model has it. The checkpoint is incomplete or does not match config.json")
    unexpected = sorted(n for n in present - expected if not is_ignored(cfg, n))
    if unexpected:
        raise CheckpointError(
            f"{ckpt.file_of(unexpected[0])}: tensor {unexpected[0]!r} is not part of the model config.json "
            f"describes ({len(unexpected)} such tensors); config.json does not match the weights")


def _build_model(cfg: ModelConfig, ckpt: Checkpoint, dev: torch.device, dt: torch.dtype) -> K2Model:
    r = cfg.rope
    rope = YarnRope(cfg.qk_rope_head_dim, r.theta, r.type, r.factor, r.original_max_position_embeddings,
                    r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim,
                    max_positions=min(cfg.max_position_embeddings, 8192), device=dev)
    with torch.device("meta"):
        model = K2Model(cfg, rope)
    for name, spec in dense_tensors(cfg).items():
        want = torch.float32 if name.endswith(FP32_SUFFIXES) else dt
        set_tensor(model, name, ckpt.get(name, dtype=want, expect_shape=spec.shape).to(dev))
    return model.eval()


def _tokenizer(model_dir: Path):
    from hybrid.text.tokenizer import Tokenizer, TokenizerMissing
    try:
        return Tokenizer.from_dir(model_dir)
    except TokenizerMissing:
        return None
