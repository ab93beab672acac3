"""memjax: memory layers at scale (product-key memory, Memory+) in JAX and Flax NNX.

The data flow, file by file: `config` -> `model` (blocks from `layers/`, the memory layer in
`layers/memory.py`) -> `ops` (product-key top-k, the embedding bag) -> kernels in `pallas_kernels`.
"""

__version__ = "0.1.0"
