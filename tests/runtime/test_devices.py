"""The device map: layers split over several devices as `hybrid plan` splits them, checked on the CPU stand-in
(the same CPU listed several times: each entry a logical device with its own layers, KV pool and hot set)."""
import json
import shutil
from dataclasses import asdict

import pytest
import torch

import hybrid
from hybrid.cli import main
from hybrid.core.config import ModelConfig
from hybrid.core.placement import PlanError, plan_placement

PROMPT = [5, 77, 300, 12, 990, 41, 41, 7]
CONTEXT = 256


def _tight_memory(model_dir, n: int, budget: str, form: str = "bf16", dtype_bytes: int = 4, dense: str = "torch") -> int:
    """The least memory per device on which the runtime's plan (float32 on the CPU, fp8 experts, dense="torch",
    the hot set in `form`) gives the hot set all of `budget`: so tight that the layers spread over all n devices
    (with packed dense layers the lm_head, kept bf16, outweighs a layer and two layers share a device)."""
    cfg = ModelConfig.from_file(model_dir)

    def plan(m):
        return plan_placement(cfg, device="cpu", dtype_bytes=dtype_bytes, expert_format="fp8", context=CONTEXT,
                              device_memory=m, host_memory=2**40, gpu_expert_budget=budget,
                              hot_set_format=form, devices=("cpu",) * n, dense_format=dense)
    want = plan(2**40).experts_per_layer
    lo, hi = 1, 2**30
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            ok = plan(mid).experts_per_layer == want
        except PlanError:
            ok = False
        lo, hi = (lo, mid) if ok else (mid + 1, hi)
    assert len(plan(lo).shares) == n
    return lo


@pytest.mark.parametrize("kind", ["k2", "v3", "noqlora"])
def test_map_of_logical_devices_gives_the_logits_of_one_device(tiny_models, kind):
    d = tiny_models(kind, "fp8")
    cfg = ModelConfig.from_file(d)
    n = cfg.num_hidden_layers                                       # one layer per device: every boundary used
    opts = dict(gpu_expert_budget="25%", context=CONTEXT, threads=1, dense="torch")
    one = hybrid.load(d, device="cpu", **opts)
    many = hybrid.load(d, devices=",".join(["cpu"] * n), gpu_memory=_tight_memory(d, n, "25%"), **opts)
    assert [s.layers for s in many.plan.shares] == [range(L, L + 1) for L in range(n)]
    assert many.plan.experts_per_layer == one.plan.experts_per_layer == 4
    assert torch.equal(one.forward(PROMPT), many.forward(PROMPT))
    for eng in (one, many):
        eng.reset_stats()
    assert one.generate(PROMPT, 8, stop_ids=()) == many.generate(PROMPT, 8, stop_ids=())

    devs = many.stats().devices
    assert [x.layers for x in devs] == [(L, L) for L in range(n)]
    assert devs[0].embed and devs[-1].head and not any(x.head for x in devs[:-1])
    assert [x.kv_bytes for x in devs] == [8 * 32 * cfg.kv_cache_dim * 4] * n     # 8 blocks of 32 rows, fp32
    assert sum(x.kv_bytes for x in devs) == one.stats().devices[0].kv_bytes == one.kv.nbytes
    hot = one.stats().expert_backend.hot_set.per_layer
    for x in devs:                                                  # each device: its own layers' hot set
        (L, _), moe = x.layers, x.layers[0] in cfg.moe_layers
        assert x.hot_set_hits == (hot[L].hot_set if moe else 0)
        assert x.hot_set_loads == (hot[L].loads if moe else 0)
    assert sum(x.hot_set_hits for x in devs) == one.stats().expert_activations.hot_set > 0
    # each device with MoE layers has its own copier (and, packed, its own decode buffer)
    assert len(many.experts.copiers) == len(cfg.moe_layers) and len(one.experts.copiers) == 1


def test_each_device_keeps_the_dense_decode_buffer_the_placement_counts(tiny_models, monkeypatch):
    """Packed dense layers dequantized per use (CUDA's DeviceDense, run here on CPU stand-ins): after a forward,
    each device's buffer is what DeviceBytes counts for it, the largest packed linear among its parts (layer
    0's dense MLP, o_proj, lm_head), not one buffer for the whole model."""
    from hybrid.core.placement import DeviceBytes
    from hybrid.runtime import dense as rd
    d = tiny_models("v3", "fp8")
    cfg = ModelConfig.from_file(d)
    monkeypatch.setattr("hybrid.runtime.loader.modules_for", lambda dense, dev, dt, pool, act: rd.DeviceDense(dev, dt))
    n = cfg.num_hidden_layers
    eng = hybrid.load(d, devices=",".join(["cpu"] * n), gpu_memory=_tight_memory(d, n, "25%"),
                      gpu_expert_budget="25%", context=CONTEXT, threads=1, dense="auto")
    assert len(eng.plan.shares) > 1
    eng.forward(PROMPT)
    counted = DeviceBytes.of(cfg, 4, "fp8", "bf16", dense="auto", dense_decoded=True).dense_buffers
    layers = eng.model.model.layers
    held = []
    for s in eng.plan.shares:
        scratch = {id(m._dense.scratch): m._dense.scratch for L in s.layers for m in layers[L].modules()
                   if isinstance(m, rd.DeviceLinear)}
        if s.head:
            scratch[id(eng.model.lm_head._dense.scratch)] = eng.model.lm_head._dense.scratch
        assert len(scratch) == 1                                       # one buffer per device
        parts = ([0] if s.embed else []) + [L + 1 for L in s.layers] + ([n + 1] if s.head else [])
        held.append((next(iter(scratch.values())).nbytes, max(counted[p] for p in parts)))
    assert all(h == c for h, c in held), held
    assert len({h for h, _ in held}) > 1                               # the devices' buffers differ


@pytest.mark.parametrize("kind", ["k2", "v3"])
def test_packed_dense_layers_on_a_map_give_the_logits_of_one_device(tiny_models, kind):
    """The default dense choice (the checkpoint's FP8 on the kernels) split over two devices."""
    d = tiny_models(kind, "fp8")
    opts = dict(gpu_expert_budget="25%", context=CONTEXT, threads=1)
    one = hybrid.load(d, device="cpu", **opts)
    many = hybrid.load(d, devices="cpu,cpu", gpu_memory=_tight_memory(d, 2, "25%", dense="auto"), **opts)
    assert len(many.plan.shares) == 2 and many.info.dense == "auto"
    assert torch.equal(one.forward(PROMPT), many.forward(PROMPT))
    assert one.generate(PROMPT, 8, stop_ids=()) == many.generate(PROMPT, 8, stop_ids=())


def test_packed_hot_set_on_a_map_keeps_a_buffer_per_device(tiny_models):
    d = tiny_models("k2", "fp8")
    opts = dict(gpu_expert_budget="25%", context=CONTEXT, threads=1, hot_set_format="packed", dense="torch")
    one = hybrid.load(d, device="cpu", **opts)
    many = hybrid.load(d, devices="cpu,cpu,cpu", gpu_memory=_tight_memory(d, 3, "25%", "packed"), **opts)
    moe_devices = {s.index for s in many.plan.shares for L in s.layers if L in many.cfg.moe_layers}
    assert len(many.experts.buffers) == len(moe_devices) >= 1 and len(one.experts.buffers) == 1
    assert many.plan.hot_set_bytes == one.plan.hot_set_bytes + (len(moe_devices) - 1) * one.plan.decode_buffer_bytes
    assert torch.equal(one.forward(PROMPT), many.forward(PROMPT))


def test_torch_reference_experts_follow_their_layers(tiny_models):
    d = tiny_models("v3", "fp8")
    one = hybrid.load(d, device="cpu", experts="torch", context=CONTEXT)
    many = hybrid.load(d, devices="cpu,cpu", experts="torch", context=CONTEXT, gpu_memory=_tight_memory(d, 2, "0"))
    assert len(many.plan.shares) == 2
    assert torch.equal(one.forward(PROMPT), many.forward(PROMPT))


@pytest.mark.parametrize("memory", ["4MiB", "5MiB", "9MiB"])
def test_hybrid_plan_prints_the_placement_hybrid_load_performs(tiny_models, capsys, memory):
    """Same model, same budget (all experts), same memory per device (no reserve), bf16 on both, fp8 dense
    layers read packed (the CPU devices' kernels; a CUDA device would dequantize them into a buffer, which the
    plan then counts and so would the runtime: dense_decoded)."""
    d = tiny_models("k2", "fp8")
    assert main(["plan", "--config", str(d), "--gpus", "3xA100-80GB", "--gpu-memory", memory, "--set",
                 "gpu_reserve=0", "--set", "dense_decoded=false", "--cpu", "genoa", "--format", "fp8", "--context", str(CONTEXT), "--policies",
                 "static", "--calibration", "/nonexistent/cal.json", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    eng = hybrid.load(d, devices="cpu,cpu,cpu", dtype="bfloat16", gpu_memory=memory, gpu_expert_budget="100%",
                      context=CONTEXT, threads=1)
    placed = [asdict(s) for s in eng.plan.shares]
    assert eng.plan.experts_per_layer == planned["experts_per_layer"]
    # the planner's lm_head bytes count the one embedding row a token reads (perf.ModelCost.head_bytes); the
    # runtime holds no such row: the last device differs by exactly that, nothing else does
    row = eng.cfg.hidden_size * 2
    last = planned["gpus"][-1]
    last["dense_bytes"] -= row
    last["free_bytes"] += row
    assert placed == planned["gpus"]
    assert len(eng.stats().devices) == len(placed)
    lines = eng.plan.describe().splitlines()
    assert [x.split(": ", 1)[1] for x in lines[1:1 + len(placed)]] == \
        [s.describe(sum(L in eng.cfg.moe_layers for L in s.layers), eng.plan.experts_per_layer).split(": ", 1)[1]
         for s in eng.plan.shares]


@pytest.fixture
def config_only(tiny_models, tmp_path):
    """A folder with the tiny model's config.json and no weights: errors that come first never reach them."""
    shutil.copy(tiny_models("k2", "fp8") / "config.json", tmp_path / "config.json")
    return tmp_path


@pytest.mark.parametrize("kwargs, message", [
    (dict(devices="tpu:0"), "devices='tpu:0': device 'tpu:0' is not a device name"),
    (dict(devices="cpu,,cpu"), "has an empty entry"),
    (dict(devices="auto,cpu"), "'auto' stands for the whole map"),
    (dict(device="cpu", devices="cpu,cpu"), "not both"),
    (dict(devices="cpu,cpu,cpu,cpu"), "lists 4 devices but the model has 3 layers"),
    (dict(devices="cpu,cpu", gpu_memory="1MiB", context=CONTEXT),
     r"2 x cpu device of 1.0 MiB offer 2.0 MiB, but dense weights take 1.8 MiB and the KV cache for 256 tokens"),
    (dict(devices="cpu,cpu", gpu_memory="2MiB"), "the most context that fits is \\d+ tokens"),
])
def test_bad_maps_fail_before_any_weight_is_read(config_only, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hybrid.load(config_only, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_map_without_cuda(config_only):
    with pytest.raises(ValueError, match="devices='cuda:0,cuda:1': device 'cuda:0' was asked for but CUDA is not"):
        hybrid.load(config_only, devices="cuda:0,cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_map_errors(config_only):
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device 'cuda:{n}' was asked for but this machine has {n} CUDA"):
        hybrid.load(config_only, devices=f"cuda:0,cuda:{n}")
    with pytest.raises(ValueError, match="lists cuda:0 more than once"):
        hybrid.load(config_only, devices="cuda:0,cuda")
    with pytest.raises(ValueError, match="mixes the CPU with CUDA"):
        hybrid.load(config_only, devices="cuda:0,cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_gpu_map_equals_the_device(tiny_models):
    d = tiny_models("k2", "fp8")
    a = hybrid.load(d, device="cuda:0", gpu_expert_budget="25%", context=CONTEXT)
    b = hybrid.load(d, devices="cuda:0", gpu_expert_budget="25%", context=CONTEXT)
    assert len(b.plan.shares) == 1 and torch.equal(a.forward(PROMPT), b.forward(PROMPT))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("hot_set_format", ["bf16", "packed"])
def test_cuda_two_gpus_give_the_logits_of_one(tiny_models, hot_set_format):
    d = tiny_models("k2", "fp8")
    opts = dict(gpu_expert_budget="25%", context=CONTEXT, dtype="float32", hot_set_format=hot_set_format)
    one = hybrid.load(d, device="cuda:0", **opts)
    two = hybrid.load(d, devices="cuda:0,cuda:1", gpu_memory=_tight_memory(d, 2, "25%", hot_set_format), **opts)
    assert [str(s.device) for s in two.model.devices.spans] == ["cuda:0", "cuda:1"]
    assert two.model.devices.last == torch.device("cuda:1")
    assert [p.kv.device for p in two.kv.pools] == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert (one.forward(PROMPT) - two.forward(PROMPT)).abs().max().item() < 1e-5
    assert one.generate(PROMPT, 8, stop_ids=()) == two.generate(PROMPT, 8, stop_ids=())
    assert sum(x.hot_set_hits for x in two.stats().devices) == one.stats().expert_activations.hot_set
