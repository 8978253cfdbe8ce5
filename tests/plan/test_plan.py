"""`hybrid plan`: the performance model and the placement on cases worked out on paper, the presets, the CLI's
output and its errors, and calibration on this machine (small sizes)."""
import json
from dataclasses import replace

import pytest

from hybrid.cli import main
from hybrid.core.config import ModelConfig
from hybrid.core.knobs import HotSetSize
from hybrid.plan.hardware import DEV_CALIBRATION, GPUS, GpuSpec, Machine, parse_gpus, parse_host, parse_rate
from hybrid.plan.known_models import resolve_config
from hybrid.plan.perf import ModelCost, Rates, decode_time, prefill_time
from hybrid.core.placement import PlanError, dense_device_bytes, dense_format_of, expert_host_bytes
from hybrid.core.weights import dense_tensors, numel
from quant.dense import dense_kind
from quant.formats import bytes_per_matrix
from hybrid.plan.planner import PlanRequest, host_check, make_plan, place
from hybrid.profile.synth import params_with, synthesize
from hybrid.models.tiny import PRESETS

# A model small enough to add up by hand: a dense layer and a MoE layer, 4 experts, top-2.
HAND = ModelCost(layers=((False, 100, 200, 0), (True, 100, 50, 0)), head_bytes=50, head_params=0, embed_bytes=0,
                 kv_bytes_per_token=1, expert_host=10, expert_device=40, expert_params=20, top_k=2, n_experts=4,
                 attn_flops_per_pair=0, kvb_flops_per_token=0)
RATES = Rates(hbm=100, cpu_experts=10, link=20, dequantize=10, device_flops=100, cpu_flops=10,
              token_s=1, dense_layer_s=2, moe_layer_s=3, overlap=True)


def test_decode_time_by_hand_with_overlap():
    r = decode_time(HAND, RATES, hit=0.5, loads=0.5, context=10)
    # token 1 + 50/100; dense 2 + (100+10)/100 + 200/100; MoE 3 + 110/100 + max((50 + 2*.5*40)/100, 2*.5*10/10)
    compute = 1.5 + 5.1 + (3 + 1.1 + max(0.9, 1.0))
    # copies: 0.5 per token x 1 MoE layer: host 0.5*20/10 = 1.0 (serial), link 0.5*40/20 = 1.0 (side stream)
    assert r["seconds"] == pytest.approx(max(compute, 1.0) + 1.0)
    assert r["terms_s"]["fixed costs"] == pytest.approx(6.0)
    assert r["terms_s"]["device memory bandwidth"] == pytest.approx(0.5 + 3.1 + 2.0)
    assert r["terms_s"]["DRAM bandwidth"] == pytest.approx(1.0)
    assert r["terms_s"]["host copies + link"] == pytest.approx(1.0)      # the link's 1.0 s hides behind compute
    assert r["binding"] == "fixed costs" and r["roofline_per_s"] == pytest.approx(1 / 6)


def test_decode_time_by_hand_without_overlap():
    r = decode_time(HAND, Rates(**{**RATES.__dict__, "overlap": False, "serial": 1.0}), hit=0.5, loads=0.5,
                    context=10)
    assert r["seconds"] == pytest.approx(1.5 + 5.1 + (3 + 1.1 + 0.9 + 1.0) + 1.0 + 1.0)


def test_decode_time_packed_copies_cost_staging_and_link():
    r = decode_time(HAND, Rates(**{**RATES.__dict__, "dequantize": float("inf"), "stage": 5, "packed_copies": True}),
                    hit=0.5, loads=0.5, context=10)
    # 0.5 copies per token: staging 0.5 * 10 / 5 = 1.0 s on the host; the packed 10 bytes cross the link in
    # 0.5 * 10 / 20 = 0.25 s on the side stream, hidden behind the 11.7 s of compute
    assert r["seconds"] == pytest.approx(11.7 + 1.0) and r["link_s"] == pytest.approx(0.25)


def test_decode_time_partial_overlap_and_measured_layer_rates():
    r = decode_time(HAND, Rates(**{**RATES.__dict__, "serial": 0.5, "attn": 50, "ffn": 25, "dense": 200}),
                    hit=0.5, loads=0.0, context=10)
    # token 1.5; dense 2 + 100/50 + 10/100 + 200/200; MoE 3 + 2 + 0.1 + max(G, C) + 0.5 min(G, C) with
    # G = (50 + 40) / 25 = 3.6 and C = 1.0
    assert r["seconds"] == pytest.approx(1.5 + 5.1 + (5.1 + 3.6 + 0.5))


def test_decode_time_all_on_cpu_and_all_on_device():
    none = decode_time(HAND, RATES, hit=0.0, loads=0.0, context=0)
    full = decode_time(HAND, RATES, hit=1.0, loads=0.0, context=0)
    assert none["terms_s"]["DRAM bandwidth"] == pytest.approx(2 * 10 / 10)
    assert "DRAM bandwidth" not in full["terms_s"]
    assert full["terms_s"]["device memory bandwidth"] == pytest.approx(0.5 + 3.0 + 1.0 + (50 + 80) / 100)


def test_prefill_time_by_hand():
    c = ModelCost(layers=((True, 100, 0, 50),), head_bytes=0, head_params=0, embed_bytes=0, kv_bytes_per_token=0,
                  expert_host=10, expert_device=20, expert_params=10, top_k=1, n_experts=2, attn_flops_per_pair=0,
                  kvb_flops_per_token=0)
    r = prefill_time(c, Rates(**{**RATES.__dict__, "moe_layer_s": 2}), hit=0.0, loads=0.0, prompt=2, chunk=512)
    # device: max(2*2*50 / 100, 100 / 100) = 2 s; CPU: 2 tokens x 1 expert: max(2*10*2 / 10, 1.5 experts x 10 / 10)
    # = 4 s (1.5 = 2 * (1 - (1 - 1/2)^2) distinct experts); overlapped: 4; + token 1 + MoE layer 2
    assert r["seconds"] == pytest.approx(7.0)
    assert r["binding"] == "CPU compute" and r["terms_s"]["device compute"] == pytest.approx(2.0)


def test_prefill_roofline_is_in_tokens_per_second():
    r = prefill_time(HAND, RATES, hit=0.0, loads=0.0, prompt=4, chunk=2)
    assert r["roofline_per_s"] == pytest.approx(4 / r["terms_s"][r["binding"]])


def test_hidden_link_time_does_not_bind():
    # 0.5 copies per token: the packed bytes take 0.25 s on the link, hidden behind 11.7 s of compute
    r = decode_time(HAND, Rates(**{**RATES.__dict__, "dequantize": float("inf"), "packed_copies": True}),
                    hit=0.5, loads=0.5, context=10)
    assert "host copies + link" not in r["terms_s"] and r["link_s"] == pytest.approx(0.25)


def test_model_cost_agrees_with_the_placement_byte_counts():
    cfg, _ = resolve_config("kimi-k2")
    c = ModelCost.of(cfg, 2, "int4", hot_set_format="bf16")
    stored = c.embed_bytes + sum(a + f for _, a, f, _ in c.layers) + c.head_bytes - cfg.hidden_size * 2
    assert stored == dense_device_bytes(cfg, 2)        # ModelCost builds on the placement's DeviceBytes (by hand: test_dense_bytes_follow_the_dense_format)
    assert c.expert_host == expert_host_bytes(cfg, "int4")
    assert c.expert_device == 3 * 7168 * 2048 * 2 and c.kv_bytes_per_token == 576 * 2
    assert c.moe_layers == 60 and c.layers[0][0] is False
    # K2's attention per layer: q_a 1536x7168 + q_b 12288x1536 + kv_a 576x7168 + kv_b 16384x512 + o 7168x8192,
    # plus the norms (7168 + 1536 + 512 + 7168 after attention)
    attn = 1536 * 7168 + 64 * 192 * 1536 + 576 * 7168 + 64 * 256 * 512 + 7168 * 64 * 128 + 7168 + 1536 + 512 + 7168
    assert c.layers[5][1] == attn * 2
    # packed: a resident expert is its stored slice, a hit still multiplies bf16 weights
    p = ModelCost.of(cfg, 2, "int4", hot_set_format="packed")
    assert p.packed_hot_set and p.expert_device == expert_host_bytes(cfg, "int4") == 24_772_608
    assert p.expert_weights == p.decode_buffer == c.expert_device == c.expert_weights and c.decode_buffer == 0
    assert p.hit_decode_params == 3 * 7168 * 2048 and c.hit_decode_params == 0


def test_dense_bytes_follow_the_dense_format():
    cfg, _ = resolve_config("kimi-k2")
    fp8_lin = {n: s for n, s in dense_tensors(cfg).items() if s.fp8}
    floats = {n: s for n, s in dense_tensors(cfg).items() if not s.fp8 and n != "lm_head.weight"}
    head = 163840 * 7168
    # auto on the FP8 release: its FP8 tensors as stored (codes + a float32 scale per 128x128 block), lm_head
    # bf16, the rest (norms, embeddings) bf16 and the router float32, plus one buffer as large as lm_head
    by_hand = sum(bytes_per_matrix("fp8", *s.shape) for s in fp8_lin.values()) + 2 * head + sum(
        numel(s) * (4 if n.endswith(("gate.weight", "e_score_correction_bias")) else 2) for n, s in floats.items())
    assert dense_device_bytes(cfg, 2, "auto") == by_hand + 2 * head
    assert dense_device_bytes(cfg, 2, "auto") < 0.72 * dense_device_bytes(cfg, 2)             # 15.76 of 22.14 GiB
    assert dense_device_bytes(cfg, 2, "fp8") == dense_device_bytes(cfg, 2, "auto") - 2 * head + \
        bytes_per_matrix("fp8", 163840, 7168)                                                   # lm_head fp8 too
    for dense in ("torch", "auto", "int4", "fp8", "bf16"):
        c = ModelCost.of(cfg, 2, "int4", dense=dense)
        assert c.dense_bytes - 7168 * 2 == dense_device_bytes(cfg, 2, dense)     # the placement's, + the row a token reads
    # the packed kinds are quant.dense's DENSE_LINEARS: the release's FP8 tensors and lm_head
    for name, spec in dense_tensors(cfg).items():
        assert (dense_format_of(cfg, name, spec, "int4") is not None) == (dense_kind(name) is not None), name


def test_a_packed_dense_weight_reads_its_decode_traffic_on_cuda_and_its_bytes_on_the_cpu_kernels():
    cfg, _ = resolve_config("kimi-k2")
    lin = 1536 * 7168 + 64 * 192 * 1536 + 576 * 7168 + 64 * 256 * 512 + 7168 * 64 * 128
    norms = 7168 + 1536 + 512 + 7168
    cuda = ModelCost.of(cfg, 2, "int4", dense="fp8")
    assert cuda.reads[5][0] == lin * (1 + 3 * 2 + 2) + norms * 2        # decode: 1 + 3 x 2, the product: 2
    cpu = ModelCost.of(cfg, 2, "int4", dense="fp8", dense_decoded=False)
    assert cpu.reads[5][0] == cpu.layers[5][1] == cuda.layers[5][1] < lin * 1.01 + norms * 2
    assert cpu.dense_buffer == 0 < cuda.dense_buffer == 163840 * 7168 * 2
    torch_ = ModelCost.of(cfg, 2, "int4")
    assert torch_.reads[5][0] == torch_.layers[5][1] == (lin + norms) * 2
    # int4 falls back to bf16 where the inputs are not a multiple of 32: a whole MLP when either of its sizes is
    odd = ModelConfig.from_dict({**PRESETS["tiny"], "hidden_size": 80, "moe_intermediate_size": 64,
                                 "intermediate_size": 96})
    t = dense_tensors(odd)
    assert dense_format_of(odd, "model.layers.0.mlp.down_proj.weight", t["model.layers.0.mlp.down_proj.weight"],
                           "int4") == "bf16"
    kvb = "model.layers.0.self_attn.kv_b_proj.weight"
    assert dense_format_of(odd, kvb, t[kvb], "int4") == "int4"        # its inputs: kv_lora_rank, a multiple of 32


def test_k2_on_one_rtx4090_plans_with_its_fp8_dense_part(capsys):
    args = ["plan", "--gpus", "RTX4090", "--cpu", "genoa", "--ram", "768GiB", "--calibration", "/nonexistent/cal.json",
            "--policies", "static"]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    (gpu,) = d["gpus"]
    assert d["dense_format"] == "auto" and d["dense_formats"] == "fp8, lm_head bf16"
    assert gpu["dense_bytes"] == d["dense_bytes"] == dense_device_bytes(resolve_config("kimi-k2")[0], 2, "auto") \
        + 7168 * 2 and gpu["free_bytes"] >= 0
    assert d["rows"][0]["decode_tokens_per_s"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dense part: fp8, lm_head bf16, 15.76 GiB on the GPUs with a 2.19 GiB buffer" in out
    assert "bytes of GPU memory traffic per weight int4 7, fp8 9, bf16 6" in out
    # the dense part in bf16 (22.14 GiB) does not fit one 24 GB GPU: the error says so, with the numbers
    assert main(args + ["--dense", "torch"]) == 2
    assert "dense weights take 22.14 GiB" in capsys.readouterr().err


def test_the_plan_prices_dense_formats_for_what_they_move(capsys):
    """4xA100 holds K2's dense part either way: bf16 moves 2 bytes per weight per product, FP8 dequantized per
    use 9, so the plan predicts the bf16 dense part faster at the same hot-set budget (the README says so)."""
    fast = {}
    for dense in ("torch", "auto"):
        assert main(["plan", "--gpus", "4xA100-80GB", "--cpu", "2xsapphire-rapids", "--ram", "1TiB", "--format",
                     "int4", "--gpu-expert-budget", "10%", "--policies", "static",
                     "--calibration", "/nonexistent/cal.json",
                     "--dense", dense, "--json"]) == 0
        fast[dense] = json.loads(capsys.readouterr().out)["rows"][-1]["decode_tokens_per_s"]
    assert fast["torch"] > 1.2 * fast["auto"], fast


def test_decode_time_packed_hits_pay_a_decode_per_use_and_copies_cross_as_stored():
    packed = replace(HAND, packed_hot_set=True, expert_device=10, expert_weights=40, decode_buffer=40)
    r = decode_time(packed, Rates(**{**RATES.__dict__, "decode": 20, "stage": 5}), hit=0.5, loads=0.5, context=10)
    # MoE device side: (50 + 2 * .5 * 40) / 100 = 0.9, plus 2 * .5 hits decoding 20 params at 20/s = 1.0;
    # CPU 1.0 -> MoE layer 3 + 1.1 + max(1.9, 1.0); copies: the 10 stored bytes, staged 0.5 * 10 / 5 = 1.0 s
    # on the host (no decoding), 0.5 * 10 / 20 = 0.25 s on the link, hidden
    assert r["seconds"] == pytest.approx(1.5 + 5.1 + (3 + 1.1 + 1.9) + 1.0) and r["link_s"] == pytest.approx(0.25)
    assert r["terms_s"]["device memory bandwidth"] == pytest.approx(0.5 + 3.1 + 1.1 + 1.9)


def test_packed_hot_set_keeps_a_decode_buffer_on_each_gpu():
    # TOY with 5-byte packed experts and a 10-byte buffer: 90 bytes per GPU left for layers. c=2: GPU0 holds
    # embed + L0 (60), L1 (40) does not fit; GPU1: L1 + L2 + head = 100 > 90. c=1: GPU1 = 35 + 35 + 20 = 90.
    packed = replace(TOY, packed_hot_set=True, decode_buffer=10)
    shares, cap = place(packed, _machine(), context=10, want=8)
    assert cap == 1
    g0, g1 = shares
    assert (g0.hot_bytes, g0.free_bytes) == (0, 40)                  # no MoE layer here: no buffer shown
    assert (g1.hot_bytes, g1.free_bytes) == (2 * 5 + 10, 0)          # two hot experts + the buffer
    assert place(packed, _machine(), context=10, want=0)[1] == 0


def test_k2_on_4xa100_holds_over_three_times_the_experts_packed():
    cfg, _ = resolve_config("kimi-k2")
    m = Machine(gpu=GPUS["A100-80GB"], n_gpus=4, ram=2**40, dram_bandwidth=614e9, sockets=2, cores=112,
                **DEV_CALIBRATION)
    caps = {f: place(ModelCost.of(cfg, 2, "int4", hot_set_format=f), m, 32768, 384)[1] for f in ("bf16", "packed")}
    assert caps["bf16"] == 56 and caps["packed"] > 3 * caps["bf16"]
    fp8 = place(ModelCost.of(cfg, 2, "fp8", hot_set_format="packed"), m, 32768, 384)[1]
    assert caps["bf16"] < fp8 < caps["packed"]                      # FP8: 42 MiB per expert
    with pytest.raises(ValueError, match="needs int4 or fp8 experts"):
        ModelCost.of(cfg, 2, "bf16", hot_set_format="packed")


def _machine(n_gpus=2, memory=100, **kw) -> Machine:
    gpu = GpuSpec("toy", memory, 100.0, 100.0, 20.0, "test")
    fields = {"ram": 10**6, "dram_bandwidth": 10.0, "sockets": 1, "cores": 1, "gpu_reserve": 0, "host_reserve": 0,
              **DEV_CALIBRATION, **kw}
    return Machine(gpu=gpu, n_gpus=n_gpus, **fields)


TOY = ModelCost(layers=((False, 10, 20, 0), (True, 10, 10, 0), (True, 10, 10, 0)), head_bytes=20, head_params=0,
                embed_bytes=20, kv_bytes_per_token=1, expert_host=1, expert_device=5, expert_params=1, top_k=2,
                n_experts=8, attn_flops_per_pair=0, kvb_flops_per_token=0)


def test_placement_by_hand():
    # items at context 10: embed 20, L0 30+10, L1 and L2 20+10+5c each, head 20; two GPUs of 100 bytes.
    # c=2: GPU0 = 20+40+40 = 100, GPU1 = 40+20 = 60. c=3: GPU0 = 60 (L1 is 45: 105), GPU1 = 45+45+20 = 110: no.
    shares, cap = place(TOY, _machine(), context=10, want=8)
    assert cap == 2
    g0, g1 = shares
    assert (g0.embed, g0.first_layer, g0.last_layer, g0.free_bytes) == (True, 0, 1, 0)
    assert (g1.head, g1.first_layer, g1.last_layer, g1.free_bytes, g1.hot_bytes) == (True, 2, 2, 40, 10)
    assert place(TOY, _machine(), context=10, want=1)[1] == 1       # a smaller request is honoured


def test_placement_reports_the_context_that_fits():
    # without a hot set: x <= 15 keeps L1 on GPU0; else GPU1 holds L1 + L2 + head = 60 + 2x <= 100: x <= 20
    place(TOY, _machine(), context=20, want=0)
    with pytest.raises(PlanError, match="most context that fits is 20 tokens"):
        place(TOY, _machine(), context=21, want=0)
    with pytest.raises(PlanError, match="dense weights do not fit"):
        place(TOY, _machine(n_gpus=1), context=1, want=0)


def test_host_ram_too_small_names_what_fits():
    cfg, _ = resolve_config("kimi-k2")
    m = _machine(ram=700 * 2**30)
    with pytest.raises(PlanError) as e:
        host_check(cfg, ModelCost.of(cfg, 2, "fp8"), m, "fp8")
    msg = str(e.value)
    assert "1.00 TiB" not in msg and "of host RAM, but the machine has 700.00 GiB" in msg
    assert "int4 needs 531.56 GiB (fits)" in msg and "fp8 needs" in msg


def test_presets_and_parsers():
    n, g = parse_gpus("4xA100-80GB")
    assert n == 4 and g is GPUS["A100-80GB"] and g.flops == 312e12      # dense, not the sparse 624
    assert parse_gpus("rtx4090")[1].memory == 24 * 2**30
    assert GPUS["H100"].flops == 989.5e12 and GPUS["H200"].bandwidth == 4800e9
    s, h = parse_host("2xsapphire-rapids")
    assert s == 2 and h.bandwidth == 8 * 4800e6 * 8                   # 307.2 GB/s per socket
    assert parse_rate("600GB/s") == 600e9 and parse_rate("25 GB/s") == 25e9
    with pytest.raises(ValueError, match="unknown GPU 'B200'.*known: A100-40GB"):
        parse_gpus("8xB200")
    with pytest.raises(ValueError, match="unknown CPU preset"):
        parse_host("2xpentium")
    for spec in GPUS.values():
        assert spec.source and spec.memory > 0 and spec.link > 0


def test_overrides_are_read_and_checked():
    from hybrid.plan.hardware import with_overrides
    m = with_overrides(_machine(), {"kernel_efficiency.int4": "0.6", "pcie": "10GB/s", "serial": "0.5",
                                    "n_gpus": "3", "gpu_reserve": "10"})
    assert m.kernel_efficiency["int4"] == 0.6
    assert m.kernel_efficiency["fp8"] == DEV_CALIBRATION["kernel_efficiency"]["fp8"]
    assert m.gpu.link == 10e9 and m.serial == 0.5 and m.n_gpus == 3 and isinstance(m.n_gpus, int)
    for bad, msg in [({"dram_efficiency": "0"}, "must lie in"), ({"pcie": "0GB/s"}, "must lie in"),
                     ({"serial": "5"}, "must lie in"), ({"kernel_efficiency": "0.5"}, "per format"),
                     ({"gpu": "x"}, "unknown machine field"), ({"sockets": "-1"}, "must lie in"),
                     ({"gpu_reserve": "1TiB"}, "smaller than the GPU's memory"), ({"mfu": "x"}, "wants a number")]:
        with pytest.raises(ValueError, match=msg):
            with_overrides(_machine(), bad)


def test_a_trace_without_decode_steps_lends_its_all_token_figures():
    from hybrid.plan.planner import hit_rates
    t = synthesize("kimi-k2", params_with(n_requests=2, prompt_tokens=64, new_tokens=0), n_layers=1)
    rows, notes = hit_rates(t, 38, ("static",), 1 / 16)
    assert rows["static"]["decode_hit_rate"] == rows["static"]["prefill_hit_rate"] > 0
    assert notes and "no decode steps" in notes[0]


def test_a_dense_model_is_refused():
    cfg = ModelConfig.from_dict({**PRESETS["tiny"], "first_k_dense_replace": 3})
    with pytest.raises(PlanError, match="no MoE layers"):
        make_plan(PlanRequest(cfg, "dense", _machine(n_gpus=1, memory=2**30, ram=2**30), "int4", 128, lambda: None))


def test_plan_on_a_tiny_config_with_a_trace():
    cfg = ModelConfig.from_dict(PRESETS["tiny"])
    trace = synthesize(__import__("hybrid.profile.trace", fromlist=["TraceModel"]).TraceModel.from_config(cfg),
                       params_with(n_requests=2, prompt_tokens=64, new_tokens=16))
    m = _machine(n_gpus=1, memory=64 * 2**20, ram=2**30)
    plan = make_plan(PlanRequest(cfg, "tiny", m, "int4", 1024, trace, hot_set=HotSetSize.parse("25%"),
                                 prompt_tokens=256))
    assert plan.experts_per_layer == 4 and not plan.hot_set_capped
    assert [r["policy"] for r in plan.rows] == ["none", "static", "lru", "lfu", "router"]
    none, static = plan.rows[0], plan.rows[1]
    assert none["decode_hit_rate"] == 0 and static["decode_hit_rate"] > 0
    assert static["decode_copies_per_token_layer"] == 0
    # hits move routed-expert bytes from the CPU side to the device side, nothing else changes
    cost = ModelCost.of(cfg, m.dtype_bytes, "int4")
    moved = cost.moe_layers * cost.top_k * static["decode_hit_rate"]
    saved = none["decode"]["cpu_expert_bytes"] - static["decode"]["cpu_expert_bytes"]
    assert saved == pytest.approx(moved * cost.expert_host)
    assert "GPU 0" in plan.describe() and json.dumps(plan.to_json())


def test_cli_plan_k2_json(capsys):
    rc = main(["plan", "--gpus", "4xA100-80GB", "--cpu", "2xsapphire-rapids", "--ram", "1TiB", "--context", "32k",
               "--calibration", "/nonexistent/cal.json", "--policies", "static,router", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["gpus"]) == 4 and d["experts_per_layer"] > 0 and d["context"] == 32768
    assert d["host_store_bytes"] == 384 * 60 * expert_host_bytes(resolve_config("kimi-k2")[0], "int4")
    assert [r["policy"] for r in d["rows"]] == ["none", "static", "router"]
    for r in d["rows"]:
        assert r["decode_tokens_per_s"] > 0 and r["decode"]["binding"]
    assert any("development machine" in a for a in d["assumptions"])


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8xB200", "--cpu", "genoa"], "unknown GPU 'B200'"),
    (["--gpus", "H100", "--cpu", "genoa", "--ram", "256GiB"], "of host RAM, but the machine has 256.00 GiB"),
    (["--gpus", "RTX4090", "--cpu", "genoa", "--dense", "bf16"], "dense weights do not fit"),
    (["--gpus", "2xRTX4090", "--gpu-memory", "16GiB", "--cpu", "genoa", "--context", "128k", "--dense", "bf16"],
     "most context that fits is"),
    (["--gpus", "H100"], "--cpu 2xsapphire-rapids"),
    (["--cpu", "genoa"], "--gpus 4xA100-80GB"),
    (["--gpus", "H100", "--cpu", "genoa", "--config", "llama"], "unknown model 'llama'"),
    (["--gpus", "H100", "--cpu", "genoa", "--format", "bf16", "--hot-set-format", "packed"],
     "needs int4 or fp8 experts, but these are bf16"),
])
def test_cli_plan_bad_input(capsys, args, message):
    assert main(["plan", "--calibration", "/nonexistent/cal.json", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybrid: error: ") and message in err and "Traceback" not in err


def test_calibrate_then_plan_this_machine(tmp_path, capsys, monkeypatch):
    from hybrid.plan import calibrate as calibrate_mod
    from hybrid.plan.calibrate import calibrate, load_calibration
    monkeypatch.setattr(calibrate_mod.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the shared test host: idle
    d = tmp_path / "tiny"
    from hybrid.models.tiny import make_tiny
    make_tiny(d, tokenizer=False)
    cfg = ModelConfig.from_file(d)
    path = calibrate(tmp_path / "cal.json", device="cpu", threads=1, pool_gib=0.02, formats=("fp8",),
                     device_gib=0.05, configs=[cfg], join_shape=(512, 256), log=lambda s: None)
    cal = load_calibration(path)
    fp8 = cal.formats["fp8"]
    assert 0 < fp8.kernel_efficiency and fp8.decode_gbs > 0 and fp8.dequantize_params_per_s > 0
    assert cal.device.matvec_gbs > 0 and cal.overheads.moe_layer_s >= 0
    assert 0 <= cal.serial <= 1 and cal.load.before == 0 and not cal.load.under_load
    (mod,) = cal.modules.values()
    assert mod.attn_gbs > 0 and mod.shared_gbs > 0 and mod.dense_gbs > 0
    assert main(["plan", "--config", str(d), "--machine", "local", "--calibration", str(path), "--format", "fp8",
                 "--context", "1k", "--prompt-tokens", "64", "--gpu-expert-budget", "25%",
                 "--hot-set-format", "packed", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["machine"]["overlap"] is False and out["experts_per_layer"] == 4
    # the stand-in copies the packed bytes and decodes them with the Numba decoder that was timed
    assert out["hot_set_format"] == "packed" and out["machine"]["packed_copies"] is True
    assert out["machine"]["decode"]["fp8"] == out["machine"]["dequantize"]["fp8"] == fp8.dequantize_params_per_s
    # the dense linears run packed on the CPU kernels (--dense auto): at the kernels' rate for their format
    kernels = out["machine"]["kernel_efficiency"]["fp8" if cfg.is_fp8_checkpoint else "bf16"]
    assert out["machine"]["dense_decoded"] is False
    assert out["machine"]["attn_rate"] == out["machine"]["dense_rate"] == pytest.approx(
        cal.read_gbs * 1e9 * kernels)
    assert cal.device.memcpy_gbs > 0 and cal.device.h2d_gbs is None
    assert main(["plan", "--config", str(d), "--machine", "local", "--calibration", str(path), "--format",
                 "int4"]) == 2
    assert "measured the fp8 kernels, not int4" in capsys.readouterr().err
    assert out["machine"]["kernel_efficiency"]["fp8"] == pytest.approx(fp8.kernel_efficiency)


def test_load_calibration_errors(tmp_path):
    from hybrid.plan.calibrate import load_calibration
    with pytest.raises(FileNotFoundError, match="hybrid plan --calibrate"):
        load_calibration(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a calibration file"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(ValueError, match="version-1 calibration"):
        load_calibration(tmp_path / "old.json")


def test_a_calibration_of_an_earlier_release_loads_and_a_broken_one_names_its_field(tmp_path):
    """Files written before memcpy/h2d, join and modules were measured still load (optional fields); a
    mistyped field is refused with the file, the field's path and the fix."""
    from hybrid.plan.calibrate import load_calibration
    from hybrid.plan.calibration import CalibrationError
    fmt = {"decode_gbs": 20.0, "kernel_efficiency": 0.9, "prefill_gflops_per_thread": 100.0,
           "dequantize_params_per_s": 1e9, "path": "avx512"}
    old = {"version": 1, "created": "2026-11-01T00:00:00Z", "cpu": "x", "threads": 2, "ram_bytes": 2**34,
           "cpu_side": {"read_gbs": 25.0, "formats": {"fp8": fmt}},
           "device_side": {"device": "cpu", "dtype": "float32", "dtype_bytes": 4, "memory_bytes": None,
                           "matvec_gbs": 20.0, "matmul_gflops": 500.0, "copy_gbs": 5.0},
           "overheads": {"token_s": 1e-4, "dense_layer_s": 2e-4, "moe_layer_s": 5e-4}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    cal = load_calibration(tmp_path / "old.json")
    assert cal.serial is None and cal.modules == {} and cal.device.stage_gbs == 5.0 and cal.device.link_gbs == 5.0
    assert cal.formats["fp8"].kernel_efficiency == 0.9 and cal.overheads.moe_layer_s == 5e-4
    old["device_side"]["matvec_gbs"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(old))
    with pytest.raises(CalibrationError, match=r"bad.json: device_side.matvec_gbs is missing or not a number; "
                                               r"run `hybrid plan --calibrate` again"):
        load_calibration(tmp_path / "bad.json")
