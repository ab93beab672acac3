"""What memjax knows of the accelerators it runs on: their bf16 peak, a compiled program's FLOPs,
and the memory a device has in use.

One table for every consumer: the training loop's MFU and (meant to replace the peaks of its
`GENERATIONS`) `memjax.aot`'s roofline. A JAX device counts here as the vendors count a chip: one
TPU chip (v4 and v5p run their two TensorCores as one device) or one GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Peak:
  flops: float  # dense bf16 FLOP/s of one device
  source: str  # the vendor's page the number comes from


# Dense bf16 peaks keyed by JAX's `device_kind` (or its first words: NVIDIA names a GPU with its
# memory and form, "NVIDIA A100-SXM4-80GB"). The longest key the kind starts with wins, so
# "TPU v5 lite" (v5e) is not "TPU v5" (v5p), nor "NVIDIA H100 PCIe" the SXM part.
# TPUs: Google's Cloud TPU system-architecture pages, "Peak compute per chip (bf16)" (the numbers
# memjax.aot uses). NVIDIA: the data-center product pages' "BF16 Tensor Core" rows, whose H100 and
# H200 figures are with 2:4 sparsity: halved here to the dense rate. (Read 2026-12.)
PEAKS: dict[str, Peak] = {
    "TPU v4": Peak(275e12, "cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Peak(197e12, "cloud.google.com/tpu/docs/v5e"),
    "TPU v5e": Peak(197e12, "cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Peak(459e12, "cloud.google.com/tpu/docs/v5p"),  # v5p's kind in libtpu
    "TPU v5p": Peak(459e12, "cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Peak(918e12, "cloud.google.com/tpu/docs/v6e"),
    "TPU v6e": Peak(918e12, "cloud.google.com/tpu/docs/v6e"),
    "NVIDIA H100": Peak(989e12, "nvidia.com/en-us/data-center/h100 (SXM: 1,979 sparse)"),
    "NVIDIA H100 NVL": Peak(835e12, "nvidia.com/en-us/data-center/h100 (NVL: 1,671 sparse)"),
    "NVIDIA H100 PCIe": Peak(756e12, "NVIDIA H100 PCIe datasheet (1,513 sparse)"),
    "NVIDIA H200": Peak(989e12, "nvidia.com/en-us/data-center/h200 (SXM: 1,979 sparse)"),
    "NVIDIA H200 NVL": Peak(835e12, "nvidia.com/en-us/data-center/h200 (NVL: 1,671 sparse)"),
    "NVIDIA A100": Peak(312e12, "nvidia.com/en-us/data-center/a100 (312 dense, 624 sparse)"),
}


def peak(device_kind: str) -> Peak | None:
  """The table's entry for a device kind; None for kinds it lacks (CPUs among them)."""
  keys = [k for k in PEAKS if device_kind == k or device_kind.startswith((k + " ", k + "-"))]
  return PEAKS[max(keys, key=len)] if keys else None


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program on one device; {} when the backend gives none."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) and cost else cost) or {}


def compiled_flops(compiled, loop_trips: int = 1) -> float | None:
  """FLOPs of one call of a compiled program on one device, as XLA's cost analysis counts them
  (so recomputation counts, and custom kernels count what their cost estimate says); None when
  the backend gives none. XLA counts a loop's body once: `loop_trips` scales it (the train step's
  micro-batch loop: train.grad_accum, which also counts the once-a-step update that many times)."""
  flops = cost_analysis(compiled).get("flops")
  return float(flops) * loop_trips if flops and flops > 0 else None


def mfu(flops_per_step: float | None, step_s: float, device_kind: str) -> float | None:
  """Achieved FLOP/s of one device over its peak; None without FLOPs or a known peak."""
  found = peak(device_kind)
  if found is None or not flops_per_step or step_s <= 0:
    return None
  return flops_per_step / step_s / found.flops


def memory_in_use(devices: Iterable) -> dict[str, int] | None:
  """{"bytes_in_use", "peak_bytes_in_use"}: the most of any of `devices` (from the runtime's
  allocator); None where the backend keeps no such statistics (the CPU)."""
  stats = [s for s in (d.memory_stats() for d in devices) if s and "bytes_in_use" in s]
  if not stats:
    return None
  return {key: max(int(s.get(key, 0)) for s in stats)
          for key in ("bytes_in_use", "peak_bytes_in_use")}
