"""The memory-parallel lookup: the value table's columns split over a mesh axis (spec section 3).

Within a memory group (the devices along `memory_axis`) each of its m devices holds V/m columns
of every row, and its own tokens. A lookup all-gathers the group's indices and weights (N x K
each: small next to the table), sums its column slice of the selected rows for all of the group's
tokens, and sends every token its full row back with one all-to-all:

    idx_NK, w_NK --all_gather--> (m*N, K) --bag on V/m columns--> (m*N, V/m) --all_to_all--> (N, V)

The backward is the transpose: the weight gradients are reduce-scattered back to their tokens,
and each device's table gradient is the gradient of its own slice. Nothing table-sized crosses a
device except the data-parallel sum of that slice's gradient over the axes that split the tokens
but not the table.

Axis letters (see memjax): S slots, V value dim, N tokens, K bag positions. Inside `shard_map`, N
is a device's tokens (`group_` arrays: its group's m*N) and V its column slice (V/m).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

from memjax import sharding
from memjax.ops.embedding_bag import embedding_bag


def memory_parallel_bag(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, *, memory_axis: str,
    impl: str = "auto",
) -> jax.Array:
  """Call inside `shard_map`: this device's column slice (S, V/m) and tokens (N, K) ->
  the tokens' full bags (N, V), columns in the order of the devices along `memory_axis`."""
  if jax.lax.axis_size(memory_axis) == 1:
    return embedding_bag(values_SV, idx_NK, w_NK, impl=impl)
  # The group's m*N tokens, and their bags over this device's V/m columns.
  group_idx_NK = jax.lax.all_gather(idx_NK, memory_axis, tiled=True)
  group_w_NK = jax.lax.all_gather(w_NK, memory_axis, tiled=True)
  group_read_NV = embedding_bag(values_SV, group_idx_NK, group_w_NK, impl=impl)
  return jax.lax.all_to_all(group_read_NV, memory_axis, split_axis=0, concat_axis=1, tiled=True)


def sharded_embedding_bag(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, *, mesh: jax.sharding.Mesh,
    token_axes: Sequence[str], memory_axis: str, impl: str = "auto",
) -> jax.Array:
  """`embedding_bag` over `mesh`: tokens split over `token_axes`, which include `memory_axis`
  (the devices of a memory group read different tokens, as the reference's memory-parallel ranks
  are also data-parallel ranks), and the table's columns over `memory_axis`. Same result and
  gradients as the unsharded op."""
  if memory_axis not in token_axes:
    raise ValueError(
        f"token_axes {tuple(token_axes)} must include the memory axis {memory_axis!r}: the "
        "devices of a memory group read different tokens"
    )
  m = mesh.shape[memory_axis]
  if values_SV.shape[1] % m:
    raise ValueError(
        f"the value dim {values_SV.shape[1]} must be divisible by the {memory_axis!r} mesh axis "
        f"({m} devices) that splits the table's columns"
    )
  tokens = 1
  for axis in token_axes:
    tokens *= mesh.shape[axis]
  if idx_NK.shape[0] % tokens:
    raise ValueError(
        f"{idx_NK.shape[0]} tokens do not split evenly over mesh axes {tuple(token_axes)} "
        f"({tokens} devices)"
    )
  token_spec = P(tuple(token_axes))
  lookup = jax.shard_map(
      lambda v, i, w: memory_parallel_bag(v, i, w, memory_axis=memory_axis, impl=impl),
      mesh=mesh,
      in_specs=(P(None, memory_axis), token_spec, token_spec),
      out_specs=token_spec,
  )
  return lookup(values_SV, idx_NK, w_NK)


def bag_on_mesh(table_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, impl: str) -> jax.Array:
  """`embedding_bag` on the current mesh (the caller's `jax.set_mesh`): per device on its tokens
  when the mesh has several devices, and over the table's column slices when its
  `sharding.MEMORY` axis does; one op without a mesh. What the layers call."""
  mesh = jax.sharding.get_abstract_mesh()
  memory_parallel = sharding.MEMORY in mesh.axis_names and mesh.shape[sharding.MEMORY] > 1
  if memory_parallel or sharding.token_mesh(idx_NK.shape[0]) is not None:
    return sharded_embedding_bag(
        table_SV, idx_NK, w_NK, mesh=mesh, token_axes=sharding.BATCH,
        memory_axis=sharding.MEMORY, impl=impl,
    )
  return embedding_bag(table_SV, idx_NK, w_NK, impl=impl)
