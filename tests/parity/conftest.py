"""Parity-suite environment: float32 on CPU on both sides (the one exception: cuDNN attention, which
runs in bf16 on the GPU where one is present; test_model_parity.on_device), and a summary of observed
deviations.

Tests call the `observe(check, value)` fixture with each measured deviation; the largest per check
is printed at the end of a one-process run (`pytest tests/parity -q -n 0` shows it), which is where the numbers
quoted in issue notes come from.
"""
from __future__ import annotations

from collections import defaultdict

import jax
import pytest
import torch

jax.config.update("jax_enable_x64", False)
torch.set_default_dtype(torch.float32)
torch.manual_seed(0)

_OBSERVED: dict[str, list[float]] = defaultdict(list)


@pytest.fixture(autouse=True)
def _jax_on_cpu():
    """Run jax on the CPU even where an accelerator exists: its f32 matmuls are exact f32 (no TF32).
    A test may enter the GPU inside it (`jax.default_device`) for a path only a GPU runs."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def observe():
    def record(check: str, value: float) -> None:
        _OBSERVED[check].append(float(value))
    return record


def pytest_terminal_summary(terminalreporter):
    if not _OBSERVED:
        return
    terminalreporter.section("parity: largest observed deviation per check")
    width = max(len(k) for k in _OBSERVED)
    for check in sorted(_OBSERVED):
        values = _OBSERVED[check]
        terminalreporter.write_line(f"{check:<{width}}  max {max(values):.3g}  over {len(values)} cases")
