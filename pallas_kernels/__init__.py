"""Kernels for the memory lookup, registered as `memjax.ops.embedding_bag` impls on first use.

| package | impl | platform ("auto" there) | how |
|---|---|---|---|
| `cpu/` | `cpu` | CPU | C++ through the XLA FFI, compiled on first use |
| `tpu/` | `pallas_tpu` | TPU | Pallas Mosaic; Pallas interpret mode when lowered for another platform |
| `gpu/` | `triton` | NVIDIA GPU | Triton through jax-triton |

Each is checked against the pure-JAX `xla` impl, which every platform can also run.
"""
