"""Placement plans on hand-computed K2 numbers, and the clear failures."""
import pytest

from hybrid.core.config import ModelConfig
from hybrid.core.placement import PlanError, expert_host_bytes, kv_cache_bytes, parse_size, plan_placement
from tests.core.test_config import K2

GiB = 2**30


@pytest.fixture(scope="module")
def k2():
    return ModelConfig.from_dict(K2)


def test_k2_sizes(k2):
    # INT4 g32 with bf16 scales: 2048*7168/2 codes + 2048*224*2 scale bytes per matrix, 3 matrices
    assert expert_host_bytes(k2, "int4") == 3 * (2048 * 7168 // 2 + 2048 * 224 * 2) == 24_772_608
    # FP8: codes + a [16, 56] float32 scale grid per matrix
    assert expert_host_bytes(k2, "fp8") == 3 * (2048 * 7168 + 16 * 56 * 4)
    # 576 cached values x 61 layers x 2 bytes = 70,272 bytes per token (docs/model.md, "Absorbed decode")
    assert kv_cache_bytes(k2, 1, 2) == 70_272


def test_k2_on_one_80gb_gpu(k2):
    p = plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="int4", context=32768,
                       device_memory=80 * 10**9, host_memory=1024 * GiB, gpu_expert_budget="10GiB",
                       hot_set_format="bf16")
    assert p.kv_cache_bytes == 32768 * 70_272
    per_expert = 3 * 7168 * 2048 * 2
    assert p.expert_device_bytes == per_expert and p.decode_buffer_bytes == 0
    assert p.experts_per_layer == (10 * GiB) // (per_expert * 60) == 2   # 10.7e9 / 5.28e9
    assert p.host_store_bytes == 24_772_608 * 384 * 60
    assert "hot set" in p.describe() and "32768 tokens" in p.describe()


def test_k2_packed_hot_set_counts_the_stored_bytes(k2):
    # packed int4: a resident expert is its stored slice (K2's sections need no alignment padding), and one
    # expert's worth of bf16 (the decode buffer) comes off the budget first
    p = plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="int4", context=32768,
                       device_memory=80 * 10**9, host_memory=1024 * GiB, gpu_expert_budget="10GiB",
                       hot_set_format="packed")
    assert p.hot_set_format == "packed"
    assert p.expert_device_bytes == expert_host_bytes(k2, "int4") == 24_772_608
    assert p.decode_buffer_bytes == 3 * 7168 * 2048 * 2
    assert p.experts_per_layer == (10 * GiB - 3 * 7168 * 2048 * 2) // (24_772_608 * 60) == 7
    assert p.hot_set_bytes == 7 * 60 * 24_772_608 + 3 * 7168 * 2048 * 2
    assert "packed int4" in p.describe()
    fp8 = plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="fp8", context=4096,
                         device_memory=80 * GiB, host_memory=1024 * GiB, gpu_expert_budget="25%",
                         hot_set_format="packed")
    assert fp8.expert_device_bytes == expert_host_bytes(k2, "fp8")  # [16, 56] float32 scales: 64-byte multiples
    with pytest.raises(ValueError, match="needs int4 or fp8 experts, but these are bf16"):
        plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="bf16", context=4096,
                       device_memory=80 * GiB, host_memory=4096 * GiB, hot_set_format="packed")


def test_share_budget_is_capped_by_free_memory(k2):
    p = plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="int4", context=4096,
                       device_memory=80 * 10**9, host_memory=1024 * GiB, gpu_expert_budget="25%")
    # 25 % would be 96 experts per layer; what is left after dense + KV holds far fewer
    left = 80 * 10**9 - p.dense_bytes - p.kv_cache_bytes - p.decode_buffer_bytes
    assert p.experts_per_layer == left // (p.expert_device_bytes * 60) < 96


def test_impossible_requests_say_the_numbers(k2):
    with pytest.raises(PlanError, match="KV cache for 131072 tokens") as e:
        plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="int4", context=131072,
                       device_memory=24 * GiB, host_memory=1024 * GiB)
    assert "most context that fits" in str(e.value)
    with pytest.raises(PlanError, match="host has 256.00 GiB"):
        plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="fp8", context=4096,
                       device_memory=80 * GiB, host_memory=256 * GiB)
    ok = plan_placement(k2, device="cuda", dtype_bytes=2, expert_format="fp8", context=4096,
                        device_memory=80 * GiB, host_memory=256 * GiB, mmap=True)
    assert ok.mmap


def test_parse_size():
    assert parse_size("2GiB") == 2 * GiB and parse_size("500MB") == 500_000_000 and parse_size(7) == 7
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")
