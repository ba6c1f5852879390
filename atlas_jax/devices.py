"""Peak FLOP/s per accelerator, for MFU. Matched on JAX's exact `device_kind`, never a substring:
an "NVIDIA H100 PCIe" is not an H100 SXM (756 vs 989 TFLOP/s), and a kind not in the table gets no
MFU rather than a wrong one.

Figures are dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets.
"""
from __future__ import annotations

from typing import NamedTuple

import jax


class Peak(NamedTuple):
    name: str  # what the figure is for, as printed: "H100 SXM (bf16 dense)"
    flops: float  # FLOP/s per device


_H100_SXM = Peak("H100 SXM (bf16 dense)", 989.4e12)
_A100 = Peak("A100 (bf16 dense)", 312e12)

PEAK_FLOPS: dict[str, Peak] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": Peak("H100 PCIe (bf16 dense)", 756e12),
    "NVIDIA H100 NVL": Peak("H100 NVL (bf16 dense)", 835e12),
    "NVIDIA H200": Peak("H200 SXM (bf16 dense)", 989.4e12),
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L4": Peak("L4 (bf16 dense)", 121e12),
    "NVIDIA A10G": Peak("A10G (bf16 dense)", 125e12),
    "TPU v4": Peak("TPU v4 (bf16)", 275e12),
    "TPU v5 lite": Peak("TPU v5e (bf16)", 197e12),
    "TPU v5": Peak("TPU v5p (bf16)", 459e12),
    "TPU v6 lite": Peak("TPU v6e (bf16)", 918e12),
}


def peak_for_kind(device_kind: str) -> Peak | None:
    """The table's entry for this exact device kind (surrounding spaces ignored), or None."""
    return PEAK_FLOPS.get(device_kind.strip())


def device_peak(device=None) -> Peak | None:
    """The peak of `device` (default: the first JAX device), or None when its kind is not in the table."""
    return peak_for_kind((device or jax.devices()[0]).device_kind)
