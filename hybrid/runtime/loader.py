"""hybrid.load: a model folder -> a ready Engine, in named steps.

    resolve_source   the folder, config.json, a converted store's manifest, the expert format, device(s),
                     dtype and threads                                                   -> Source
    plan_for         the placement: dense weights + KV cache + hot set on the device (or split over a device
                     map by hybrid.core.device_map, as `hybrid plan` splits it), the store in host RAM
    (checkpoint)     opened lazily; tensor names checked against the config
    build_backend    routed experts: the CPU kernels over the stores (+ a hot set), or the torch reference
    build_model      modules on the meta device (given the routers and the backend), one part per device of
                     the map, filled tensor by tensor on their devices
    Engine           model + backend + tokenizer (if present)
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_attn import YarnRope
from hybrid.core.config import ModelConfig
from hybrid.core.knobs import HotSetSize
from hybrid.core.options import RuntimeOptions, resolve_dense
from hybrid.core.placement import PlacementPlan, parse_size, plan_placement
from hybrid.core.progress import bar
from hybrid.core.weights import FP32_SUFFIXES, dense_tensors, expert_tensors, is_ignored
from cpu_experts import RowPool
from cpu_experts.paths import set_cpu_kernels
from hybrid.runtime.backends import build_cpu_backend, build_stores, build_torch_experts
from hybrid.runtime.dense import DenseModules, PackedModule, modules_for
from hybrid.runtime.device import resolve_devices, resolve_dtype, resolve_threads
from hybrid.runtime.device_map import DeviceMap
from hybrid.runtime.engine import BatchConfig, Engine, LoadInfo
from hybrid.runtime.experts import ExpertBackend
from hybrid.runtime.model import DevicePart, K2Model, build_routers, set_tensor
from hybrid.runtime.moe import RouteListeners
from quant.checkpoint import Checkpoint
from quant.dense import DenseReader, dense_kind, stored_names
from quant.errors import CheckpointError


@dataclass(frozen=True)
class Source:
    """A model folder, resolved: what it holds and how this run will use it."""
    model_dir: Path
    cfg: ModelConfig
    manifest: dict | None        # a converted store's manifest; None for an HF checkpoint
    experts: str                 # the routed-expert format this run uses (int4 | fp8 | bf16 | torch)
    dense: str                   # dense linears: "torch" (float modules) or auto | int4 | fp8 | bf16 (packed)
    dense_counted: str           # the dense choice as the placement sizes it (resolve_dense)
    devices: tuple[torch.device, ...]   # one, or the device map's (resolve_devices), in layer order
    dtype: torch.dtype
    threads: int

    @property
    def device(self) -> torch.device:
        """The first device: the embeddings, and the batch's index tensors."""
        return self.devices[0]

    @property
    def group_size(self) -> int:
        return self.manifest["group_size"] if self.manifest else 32


def load(model_dir: str | Path, **options) -> Engine:
    """Load a K2 / DeepSeek-V3 model folder and return an Engine.

    Args:
        model_dir: an HF checkpoint folder (config.json, safetensors shards; BF16 or block-FP8) or a store
            converted by `hybrid-quant convert`.
        **options: the fields of hybrid.core.options.RuntimeOptions, each documented there (device, devices,
            dtype, experts, gpu_expert_budget, prefetch, placement, transfer_budget, threads, context, gpu_memory,
            activations, ...); `hybrid generate --help` prints the same list.
    Returns:
        Engine with forward(ids), generate(ids, ...), stats(); engine.plan is the PlacementPlan.
    Example:
        >>> eng = hybrid.load("tiny-k2", device="cpu", gpu_expert_budget="25%")
        >>> eng.generate([1, 2, 3], max_new_tokens=8)
        >>> hybrid.load("tiny-k2", devices="cuda:0,cuda:1")     # layers split over two GPUs
    """
    return load_with(model_dir, RuntimeOptions.from_kwargs(options))


load.__signature__ = inspect.Signature(
    [inspect.Parameter("model_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str | Path"),
     *RuntimeOptions.signature()], return_annotation="Engine")


def load_with(model_dir: str | Path, opts: RuntimeOptions) -> Engine:
    """hybrid.load with the options already checked (the CLI builds them from its flags)."""
    set_cpu_kernels(opts.cpu_kernels)       # before any I/O: a forced ISA the CPU lacks fails here
    src = resolve_source(model_dir, opts)
    torch.set_num_threads(src.threads)
    placement = None
    if opts.prefetch == "static":
        from hybrid.core.placement_file import read_placement
        placement = read_placement(opts.placement, expect=src.cfg)   # read once: sizes the plan, seeds the set
    plan = plan_for(src, opts, placement)
    devices = DeviceMap.of(plan, src.devices)
    routes = RouteListeners()
    pool = RowPool(src.threads)        # the CPU's threads: the routed experts and, on a CPU device, the dense layers
    parts = tuple(DevicePart(s, _rope(src.cfg, s.device), modules_for(src.dense, s.device, src.dtype, pool,
                                                                       opts.activations)) for s in devices.spans)
    with Checkpoint.open(src.model_dir) as ckpt:
        check_checkpoint(src.cfg, ckpt, experts_in_checkpoint=src.manifest is None,
                         dense_format=(src.manifest or {}).get("dense_format"))
        reader = DenseReader(ckpt, "auto" if src.dense == "torch" else src.dense, src.manifest)
        with torch.device("meta"):
            routers = build_routers(src.cfg)
        backend = build_backend(src, opts, plan, devices, ckpt, routers, placement, pool)
        model = build_model(src, ckpt, routers, backend, routes, parts, reader)
        for kind, why in reader.fallbacks.items():
            warnings.warn(f"dense {kind}: {why}", stacklevel=2)
    info = LoadInfo(src.model_dir, src.experts, src.dense, src.threads, plan)
    batching = BatchConfig(opts.max_batch, opts.max_batch_tokens, opts.kv_block_size,
                           max(1, plan.context // opts.kv_block_size), opts.prefix_cache)
    return Engine(src.cfg, model, backend, _tokenizer(src.model_dir), src.device, src.dtype, info, routes, batching)


def resolve_source(model_dir: str | Path, opts: RuntimeOptions) -> Source:
    """Check the folder and read what it holds; decide the expert format, device, dtype and threads."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise FileNotFoundError(f"{model_dir} is a file; pass the model folder that holds it")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist; make one with "
                                f"`hybrid make-tiny --out {model_dir}` or point at an HF checkpoint folder")
    cfg = ModelConfig.from_file(model_dir)
    devs = resolve_devices(opts.devices, opts.device)
    if len(devs) > cfg.num_hidden_layers:
        raise ValueError(f"devices={opts.devices!r} lists {len(devs)} devices but the model has "
                         f"{cfg.num_hidden_layers} layers, and a layer is not split across devices; list at most "
                         f"{cfg.num_hidden_layers}")
    manifest = store_manifest(model_dir)
    own = manifest["expert_format"] if manifest else ("fp8" if cfg.is_fp8_checkpoint else "bf16")
    fmt = own if opts.experts == "auto" else opts.experts
    if manifest and fmt not in (own, "torch"):
        raise ValueError(f"{model_dir} is a {own} expert store; use experts='auto' (or '{own}'), or convert the "
                         f"source again with `hybrid-quant convert --format {fmt}`")
    if manifest and manifest.get("moe_layers") != cfg.moe_layers:
        raise ValueError(f"{model_dir}: the store's MoE layers {manifest.get('moe_layers')} differ from config.json's "
                         f"{cfg.moe_layers}; the store and its config.json do not match (convert again)")
    dense = resolve_dense(opts.dense, fmt, (manifest or {}).get("dense_format"))
    return Source(model_dir, cfg, manifest, fmt, dense.run, dense.counted, devs, resolve_dtype(opts.dtype, devs[0]),
                  resolve_threads(opts.threads))


def plan_for(src: Source, opts: RuntimeOptions, placement: dict | None = None) -> PlacementPlan:
    """The placement for this machine. Memory per device: gpu_memory, else the least CUDA memory free on any
    device of the map, else (the CPU) the host RAM available, shared by the CPU's entries of the map."""
    import psutil
    cfg, dev = src.cfg, src.device
    host = psutil.virtual_memory().available
    if opts.gpu_memory is not None:
        dev_mem = parse_size(opts.gpu_memory)
    elif dev.type == "cuda":
        dev_mem = min(torch.cuda.mem_get_info(d)[0] for d in src.devices)
    else:
        dev_mem = host // len(src.devices)
    context = opts.context or min(cfg.max_position_embeddings, 32768)
    torch_ref = src.experts == "torch"
    return plan_placement(cfg, device=str(dev), dtype_bytes=torch.empty(0, dtype=src.dtype).element_size(),
                          expert_format="bf16" if torch_ref else src.experts, context=context,
                          device_memory=dev_mem, host_memory=host,
                          gpu_expert_budget=HotSetSize.experts(0) if torch_ref else hot_set_size(opts, placement),
                          mmap=src.manifest is not None, group_size=src.group_size,
                          hot_set_format="bf16" if torch_ref else opts.hot_set_format,
                          devices=tuple(str(d) for d in src.devices), dense_format=src.dense_counted)


def hot_set_size(opts: RuntimeOptions, placement: dict[int, list[int]] | None) -> HotSetSize:
    """The hot set this run asks for: none with prefetch="off"; a static placement's largest layer when no
    budget is given; else gpu_expert_budget as parsed."""
    if opts.hot_set_policy is None:
        return HotSetSize.experts(0)
    if placement is not None and opts.gpu_expert_budget.is_zero:
        return HotSetSize.experts(max((len(v) for v in placement.values()), default=0))
    return opts.gpu_expert_budget


def build_backend(src: Source, opts: RuntimeOptions, plan: PlacementPlan, devices: DeviceMap, ckpt: Checkpoint,
                  routers: dict, placement: dict | None, pool: RowPool) -> ExpertBackend:
    """The routed-expert backend: the store's memory-mapped layers, or layers converted from the checkpoint.
    The CPU kernels run on `pool`, synchronously when the CPU is the device (the dense layers use it too); a
    hot set lives on each layer's device of the map."""
    stores = open_stores(src.model_dir, src.cfg) if src.manifest else None
    if src.experts == "torch":
        return build_torch_experts(src.cfg, ckpt, devices, src.dtype, stores)
    stores = stores or build_stores(src.cfg, ckpt, src.experts)
    return build_cpu_backend(src.cfg, stores, opts, plan, routers, devices, src.dtype, pool, placement)


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


def check_checkpoint(cfg: ModelConfig, ckpt: Checkpoint, experts_in_checkpoint: bool = True,
                     dense_format: str | None = None) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is (before any weight is read).
    Errors name the file and the first tensor in checkpoint order. dense_format: a store's (manifest) — an int4
    --dense store names its dense linears as quant.dense.STORED_NAMES says (their shapes: DenseReader checks)."""
    expected = dict(dense_tensors(cfg))
    for layer in cfg.moe_layers if experts_in_checkpoint else ():
        expected.update(expert_tensors(cfg, layer))
    names = set(expected)
    if dense_format == "int4":
        for name in [n for n in names if dense_kind(n) and n not in ckpt]:
            names.discard(name)
            module = name[: -len(".weight")]
            names.update(n for part in ("weight", "uk_t") for n in stored_names(module, "int4", part)
                         if n is not None and (part == "weight" or n in ckpt))
            del expected[name]
    _check_names(cfg, ckpt, names)
    for name, spec in expected.items():
        ckpt.check_shape(name, spec.shape)


def _check_names(cfg: ModelConfig, ckpt: Checkpoint, expected: set[str]) -> None:
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


def build_model(src: Source, ckpt: Checkpoint, routers: dict, backend: ExpertBackend, routes: RouteListeners,
                parts: tuple[DevicePart, ...], reader: DenseReader) -> K2Model:
    """The torch model on the meta device, one part per device, then filled: packed modules from the
    DenseReader (each once, on its part's device), every other tensor from the checkpoint (block-FP8
    dequantized) on its layer's device. The routers given are the model's own (the backend's look-ahead holds
    them too), filled here."""
    cfg, dt = src.cfg, src.dtype
    with torch.device("meta"):
        model = K2Model(cfg, parts, routers, backend, routes)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedModule)}
    plain = {n: spec for n, spec in dense_tensors(cfg).items() if not _owner(n, packed)}
    with bar(len(packed) + len(plain), "load dense", "tensor") as progress:
        for name, m in packed.items():
            m.fill(reader, name)
            progress.update()
        dense = parts[0].dense
        for name, spec in plain.items():
            value = _tensor(ckpt, reader, name, spec, _dtype_of(name, dt, dense))
            set_tensor(model, name, value.to(model.devices.tensor_device(name)))
            progress.update()
    return model.eval()


def _rope(cfg: ModelConfig, device: torch.device) -> YarnRope:
    """The rotary tables on `device` (each device of a map keeps its own)."""
    r = cfg.rope
    return YarnRope(cfg.qk_rope_head_dim, r.theta, r.type, r.factor, r.original_max_position_embeddings,
                    r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim,
                    max_positions=min(cfg.max_position_embeddings, 8192), device=device)


def _owner(name: str, packed: dict) -> bool:
    """Whether a packed module (or one above it, a whole MLP) holds tensor `name`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in packed for i in range(1, len(parts)))


def _dtype_of(name: str, dt: torch.dtype, dense: DenseModules) -> torch.dtype:
    """The router in float32; with packed dense layers the embeddings stay bf16 (a lookup converts its rows);
    everything else in the compute dtype."""
    if name.endswith(FP32_SUFFIXES):
        return torch.float32
    return torch.bfloat16 if dense.packed and name == "model.embed_tokens.weight" else dt


def _tensor(ckpt: Checkpoint, reader: DenseReader, name: str, spec, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor: as the checkpoint stores it, or (a dense linear of an int4 --dense store) dequantized."""
    if name in ckpt or dense_kind(name) is None:
        return ckpt.get(name, dtype=dtype, expect_shape=spec.shape)
    return torch.from_numpy(reader.linear(name).dequantize().reshape(spec.shape)).to(dtype)


def _tokenizer(model_dir: Path):
    from hybrid.text.tokenizer import Tokenizer, TokenizerMissing
    try:
        return Tokenizer.from_dir(model_dir)
    except TokenizerMissing:
        return None
