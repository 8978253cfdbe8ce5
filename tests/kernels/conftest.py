"""The instruction sets of the IR kernels this host can run (an AVX-512 host also runs the AVX2 kernels): tests
that take the `isa` fixture run once per set, with HYBRID_CPU_KERNELS naming it."""
import pytest

from cpu_experts import ir
from cpu_experts.paths import ENV

RUNNABLE = tuple(i for i in ir.ISAS if ir.supported(i))


@pytest.fixture(params=RUNNABLE or [pytest.param("none", marks=pytest.mark.skip(reason="CPU runs no IR kernels"))])
def isa(request, monkeypatch):
    monkeypatch.setenv(ENV, request.param)
    return request.param
