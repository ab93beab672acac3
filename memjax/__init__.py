"""memjax: memory layers at scale (product-key memory, Memory+) in JAX and Flax NNX.

The data flow, file by file: `config` -> `model` (blocks from `layers/`, the memory layer in
`layers/memory.py`, its slots chosen by `layers/selection.py`) -> `ops` (product-key top-k, the
embedding bag) -> the kernels of a lookup impl (`pallas_kernels/impls.py`). docs/architecture.md
draws it, and says where each kind of change goes.

Axis letters, the one glossary of both packages (`memjax`, `pallas_kernels`). Arrays whose shapes
matter carry them as a name suffix (`x_BTD`, `idx_NK`, `values_SV`, `scores_NH2M`), and a letter
means one thing everywhere. It names what an axis indexes, not its exact length: a device's shard
(inside `shard_map`, N is that device's tokens and V its column slice of a table), a block, a
padded or one-longer copy of an axis (a (B, T + 1) training batch, S + 1 row starts) keep the
letter. Einsum subscripts are lowercase and local to their call.

  A  micro-batches of a step (gradient accumulation)             training/step
  B  batch (a vmapped batch too)                                  everywhere
  C  cache positions (a key/value cache's capacity)               attention, model
  D  model dim                                                    layers, model
  E  half key dim (k_dim / 2)                                     selection, torch_reference
  F  FFN hidden dim (an expert's)                                 moe
  G  key/value heads                                              attention
  H  heads (attention's query heads; memory and PEER heads)       attention, selection, memory
  I  candidate pairs (i, j) of the K x K product-key grid         ops/product_keys
  J  flat lookups: the N*K (token, k) pairs in one list (MoE's    table_rows, moe, kernels
     assignments; several U lists concatenated)
  K  top-k / bag positions (knn; MoE's experts per token)         selection, ops, kernels
  L  lookups per token, H*K (PEER)                                peer
  M  sub-keys per half (n_keys)                                   selection, ops/product_keys
  N  tokens (B*T)                                                 layers, ops, kernels
  P  padded prompt positions                                      generate
  Q  rotary frequencies (Z/2)                                     attention, model
  R  selection rows, N*H: one top-k problem each                  selection, ops/product_keys
  S  slots: rows of a value table (n_keys**2; PEER's experts)     memory, ops, kernels
  T  time: sequence positions (generate's new tokens too)         model, generate
  U  distinct (unique) table rows that a step touches             table_rows, optim, step
  V  value dim: a table row's width                               memory, ops, kernels
  W  vocabulary                                                   model, generate
  X  experts (MoE)                                                moe
  Y  blocks of a tiled axis: MoE tiles, kernel chunks and grid    moe, kernels
     blocks
  Z  attention head dim                                           attention
  1  a unit axis (for broadcasting)
  2  an axis of two: the two key halves; an (even, odd) or (begin, end) pair

A module's docstring may repeat the letters it uses ("Axis letters (see memjax): ..."), never
with another meaning.
"""

__version__ = "0.1.0"
