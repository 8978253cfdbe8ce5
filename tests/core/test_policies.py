"""Hot-set policies on hand-made routing sequences: eviction order, capacity and transfer budget."""
import math

import numpy as np
import pytest

from hybrid.core.policies import make_policy


def step(p, *ids, phase="decode"):
    d = p.access(np.array([list(ids)]), phase)
    return d.hits[0].tolist(), list(d.load), list(d.evict)


def test_lru_evicts_least_recently_used():
    p = make_policy("lru", 8, 2)
    assert step(p, 0) == ([False], [0], [])
    assert step(p, 1) == ([False], [1], [])
    assert step(p, 0) == ([True], [], [])
    assert step(p, 2) == ([False], [2], [1])      # 1 is older than 0
    assert step(p, 1) == ([False], [1], [0])      # now 0 is the oldest
    assert p.resident == {1, 2}


def test_hits_are_judged_before_the_step_loads():
    p = make_policy("lru", 8, 4)
    d = p.access(np.array([[5, 6], [5, 7]]))
    assert not d.hits.any() and set(d.load) == {5, 6, 7}
    d = p.access(np.array([[5, -1]]))
    assert d.hits.tolist() == [[True, False]]


def test_transfer_budget_limits_loads():
    p = make_policy("lru", 16, 8, loads_per_token=0.5, burst=1.0)
    assert step(p, 1)[1] == []          # credit 0.5
    assert step(p, 1)[1] == [1]         # credit 1.0 -> one load
    assert step(p, 2)[1] == []
    assert step(p, 3)[1] == [3]


def test_budget_and_capacity_never_exceeded_on_random_routing():
    rng = np.random.default_rng(0)
    for name in ("lru", "lfu", "router"):
        p = make_policy(name, 32, 6, loads_per_token=0.75)
        loads = 0
        tokens = 0
        for _ in range(300):
            T = int(rng.integers(1, 4))
            ids = rng.choice(32, size=(T, 4), p=np.r_[np.full(8, 0.08), np.full(24, 0.36 / 24)])
            d = p.access(ids, "decode")
            loads += len(d.load)
            tokens += T
            assert len(p.resident) <= 6
            assert loads <= tokens * 0.75 + 1e-9
            assert not set(d.load) & set(d.evict)


def test_lfu_swaps_only_when_more_frequent():
    p = make_policy("lfu", 8, 1)
    assert step(p, 0)[1] == [0]
    assert step(p, 0) == ([True], [], [])
    assert step(p, 1) == ([False], [], [])        # count 1 < 2
    assert step(p, 1) == ([False], [], [])        # 2 == 2: no churn on a tie
    assert step(p, 1) == ([False], [1], [0])      # 3 > 2


def test_router_loads_the_prompts_favourites_after_prefill():
    p = make_policy("router", 16, 2)
    prompt = np.array([[3, 4, 0], [3, 4, 1], [3, 4, 2], [3, 5, 6]])
    d = p.access(prompt, "prefill")
    assert not d.hits.any() and set(d.load) == {3, 4} and p.resident == {3, 4}


def test_router_hysteresis_keeps_the_set_stable():
    p = make_policy("router", 16, 2)
    p.access(np.array([[3, 4]] * 4), "prefill")
    assert step(p, 9, 10)[1:] == ([], [])          # a single use does not displace a hot expert
    for _ in range(40):                             # sustained use does, as the old counts decay
        *_, = step(p, 9, 10)
    assert p.resident == {9, 10}
    p.end_request()
    assert step(p, 3)[1:] == ([], [])              # counts restarted; the set stays until beaten


def test_router_hint_raises_priority():
    p = make_policy("router", 16, 1)
    p.access(np.array([[2]]), "prefill")
    p.hint(np.array([7, 7, 7, 7, 7, 7]))
    assert step(p, 7)[1:] == ([7], [2])


def test_static_never_moves():
    p = make_policy("static", 8, 2, resident=[1, 2])
    assert step(p, 1, 5) == ([True, False], [], [])
    assert p.resident == {1, 2}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown prefetch policy"):
        make_policy("mru", 8, 2)
    with pytest.raises(ValueError, match="capacity"):
        make_policy("lru", 8, 9)
    with pytest.raises(ValueError, match="exceed the capacity"):
        make_policy("static", 8, 1, resident=[1, 2])
    assert math.isinf(make_policy("lru", 8, 2).loads_per_token)
