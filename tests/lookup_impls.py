"""The lookup implementations every numerics test runs: `xla` always, `cpu` when it builds here."""

import pytest

from pallas_kernels import cpu

_CPU_REASON = cpu.unavailable_reason()

IMPLS = (
    "xla",
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            _CPU_REASON is not None, reason=f"CPU kernels unavailable: {_CPU_REASON}"
        ),
    ),
)
