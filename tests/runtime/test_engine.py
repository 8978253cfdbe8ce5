"""The engine's generation contract on the tiny model: stop ids end a generation, bad ids and contexts are refused."""
import pytest

import hybrid


def test_stop_ids_end_generation(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")
    free = eng.generate([1, 2, 3], 8, stop_ids=())
    stopped = eng.generate([1, 2, 3], 8, stop_ids=(free[2],))
    assert stopped == free[: free.index(free[2]) + 1]


def test_bad_ids_and_context(tiny_models):
    eng = hybrid.load(tiny_models("k2", "fp8"), device="cpu", experts="torch")
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        eng.forward([1, 5000])
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], 3)
    with pytest.raises(ValueError, match="exceeds the context of 8192"):
        eng.generate([1] * 8190, 5)
