"""Accelerator kernels for the memory lookup, registered as `memjax.ops.embedding_bag` impls.

`tpu/` (Pallas Mosaic TPU) and `gpu/` (Triton through jax-triton) each pair a kernel with a
pure-JAX twin for its tests; until they land, every platform uses the `xla` implementation.
"""
