"""The hot-set knobs: one grammar each, parsed once into a typed value, resolved by one method each."""
import math

import pytest

from hybrid.core.knobs import HotSetSize, TransferBudget
from hybrid.core.options import RuntimeOptions, resolve_dense
from hybrid.core.policies import AUTO_LOADS_PER_TOKEN
from hybrid.runtime.loader import hot_set_size

GiB = 2**30


@pytest.mark.parametrize("text, kind, amount", [
    ("2GiB", "bytes", 2 * GiB), ("1024", "bytes", 1024), (1024, "bytes", 1024), ("0", "bytes", 0),
    ("25%", "share", 0.25), ("38/layer", "per_layer", 38), ("auto", "auto", 0),
])
def test_hot_set_size_grammar(text, kind, amount):
    v = HotSetSize.parse(text)
    assert (v.kind, v.amount) == (kind, pytest.approx(amount))
    assert HotSetSize.parse(v) is v and str(v) == str(text)


@pytest.mark.parametrize("text, message", [
    ("lots", "cannot read --gpu-expert-budget 'lots'; write bytes"), ("150%", "a share lies in 0%..100%"),
    ("3.5/layer", "a whole number"), ("-2/layer", "cannot read --gpu-expert-budget '-2/layer'"),
])
def test_hot_set_size_errors_name_the_grammar(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        HotSetSize.parse(text)


def test_hot_set_size_resolves_to_experts_per_layer():
    n = 16
    assert HotSetSize.parse("25%").experts_per_layer(n) == 4
    assert HotSetSize.parse("auto").experts_per_layer(n) == n
    assert HotSetSize.parse("5/layer").experts_per_layer(n) == 5
    with pytest.raises(ValueError, match="16 routed experts per layer"):
        HotSetSize.parse("17/layer").experts_per_layer(n)
    # bytes: all layers' copies plus the decode buffers, capped at the layer's experts
    assert HotSetSize.parse(3 * 100 * 2 + 50).experts_per_layer(n, expert_bytes=100, moe_layers=2, buffer_bytes=50) == 3
    assert HotSetSize.parse("1GiB").experts_per_layer(n, expert_bytes=100, moe_layers=2) == n
    with pytest.raises(ValueError, match="no expert size is known; give a share"):
        HotSetSize.parse("2GiB").experts_per_layer(n)
    assert HotSetSize.parse("10%").share(n) == 0.1 and HotSetSize.parse("4/layer").share(n) == 0.25


@pytest.mark.parametrize("text, copies", [
    ("auto", AUTO_LOADS_PER_TOKEN), ("0.25/layer", 0.25), ("unlimited", math.inf), ("800", 2.0), (800, 2.0),
])
def test_transfer_budget_in_copies_per_layer(text, copies):
    # bytes per token over all MoE layers: 800 B over 4 layers of 100 B experts = 2 copies per layer
    assert TransferBudget.parse(text).copies_per_layer(expert_bytes=100, moe_layers=4) == copies


def test_transfer_budget_errors():
    with pytest.raises(ValueError, match="cannot read --transfer-budget 'fast'; write auto"):
        TransferBudget.parse("fast")
    with pytest.raises(ValueError, match="in bytes, but here no expert size is known"):
        TransferBudget.parse("64MiB").copies_per_layer()
    assert TransferBudget.copies(math.inf) == TransferBudget.parse("unlimited")
    assert TransferBudget.copies(0.5) == TransferBudget.parse("0.5/layer")


def test_options_hold_the_parsed_values():
    o = RuntimeOptions(gpu_expert_budget="25%", transfer_budget=4096)
    assert o.gpu_expert_budget == HotSetSize("share", 0.25) and o.transfer_budget == TransferBudget("bytes", 4096)
    assert RuntimeOptions(gpu_expert_budget="1024") == RuntimeOptions(gpu_expert_budget=1024)
    with pytest.raises(ValueError, match="cannot read --gpu-expert-budget"):
        RuntimeOptions(gpu_expert_budget="many")


def test_prefetch_off_and_a_static_placement_are_decided_once():
    assert RuntimeOptions(prefetch="auto").hot_set_policy == "router"
    assert RuntimeOptions(prefetch="lru").hot_set_policy == "lru"
    off = RuntimeOptions(prefetch="off", gpu_expert_budget="50%")
    assert off.hot_set_policy is None and hot_set_size(off, None).is_zero
    static = RuntimeOptions(prefetch="static", placement="p.json")
    # the placement's largest layer, as a count (no percent string for the planner to read back)
    assert hot_set_size(static, {1: [3, 4, 5], 2: [1]}) == HotSetSize.experts(3)
    given = RuntimeOptions(prefetch="static", placement="p.json", gpu_expert_budget="2/layer")
    assert hot_set_size(given, {1: [3, 4, 5]}) == HotSetSize.experts(2)
    assert hot_set_size(RuntimeOptions(gpu_expert_budget="25%"), None) == HotSetSize("share", 0.25)


def test_dense_auto_is_resolved_once():
    assert resolve_dense("auto", "torch", None).run == "torch"
    assert resolve_dense("auto", "fp8", None) == resolve_dense("auto", "fp8", "checkpoint")
    assert resolve_dense("auto", "fp8", None).counted == "auto"
    store = resolve_dense("auto", "int4", "int4")
    assert store.run == "auto" and store.counted == "int4"
    assert resolve_dense("bf16", "torch", "int4").counted == "bf16"


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "abc", "-0.5/layer", "nan/layer", "1e999GiB"])
def test_transfer_budget_is_checked_with_or_without_a_hot_set(text):
    """Issue 28 item 12: --transfer-budget was read only when a hot set existed, so -1, nan, inf and abc
    passed silently; now the options refuse them whatever the budget."""
    from hybrid.core.options import RuntimeOptions
    with pytest.raises(ValueError, match="transfer-budget|out of range"):
        RuntimeOptions(transfer_budget=text, gpu_expert_budget=0)
