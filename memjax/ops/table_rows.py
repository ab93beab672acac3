"""The rows of a table that a step touches: compact ids for a sparse table update.

A lookup reads at most N*K of the table's S rows. `compact_rows` lists the distinct ones (sorted,
padded to a size fixed by the shapes) and renumbers the lookup's ids into that list, so the bag
can read a compact (U, V) copy of those rows and its backward writes a (U, V) gradient in place
of an (S, V) one. `merge_rows` sums the gradients of repeated rows across several such lists (the
layers that share a table, the micro-batches of a step).

Padding entries hold the id S, one past the last row: a gather with mode="clip" reads a real row
for them (which no lookup uses) and a scatter with mode="drop" skips them. `set_rows` writes
updated rows back, through a lookup impl's kernel where it has one.

Axis letters (see memjax): S slots, V value dim, N tokens, K bag positions, U distinct rows, J
flat ids (the N*K lookups, or several U lists concatenated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.ops.dispatch import kernels


def set_rows(
    table_SV: jax.Array, rows_U: jax.Array, new_UV: jax.Array, impl: str = "xla",
    factor: jax.Array | None = None,
) -> jax.Array:
  """`table_SV` scaled by `factor` (a float32 scalar; float32 tables), with the distinct rows
  `rows_U` then replaced by `new_UV` (ids >= S skipped).

  `impl`'s kernel, where it has one, runs it on one device; on a mesh of several devices it is XLA's
  scatter, which the partitioner splits along the table's sharding.
  """
  kernel = kernels(impl).set_rows
  mesh = jax.sharding.get_abstract_mesh()
  if kernel is not None and (mesh.empty or mesh.size == 1):
    return kernel(table_SV, rows_U, new_UV, factor)
  if factor is not None:
    table_SV = (factor * table_SV.astype(jnp.float32)).astype(table_SV.dtype)
  return table_SV.at[rows_U].set(new_UV.astype(table_SV.dtype), mode="drop")


def row_capacity(n_ids: int, n_slots: int) -> int:
  """The compact list's length: no more rows than ids, nor than the table holds."""
  return max(min(n_ids, n_slots), 1)


def _segments(ids_J: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array]:
  """(rows_U, segment_J): the distinct ids in ascending order, padded with n_slots, and each
  id's position in that list."""
  n = ids_J.shape[0]
  order_J = jnp.argsort(ids_J, stable=True)
  sorted_J = ids_J[order_J]
  starts_J = jnp.concatenate([jnp.ones((1,), bool), sorted_J[1:] != sorted_J[:-1]])
  segment_sorted_J = jnp.cumsum(starts_J.astype(jnp.int32)) - 1
  capacity = row_capacity(n, n_slots)
  rows_U = jnp.full((capacity,), n_slots, jnp.int32).at[segment_sorted_J].set(
      sorted_J.astype(jnp.int32), mode="drop")
  segment_J = jnp.zeros((n,), jnp.int32).at[order_J].set(segment_sorted_J)
  return rows_U, segment_J


def compact_rows(idx_NK: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array]:
  """(rows_U, local_NK): the distinct row ids of `idx_NK` (ascending, padded with `n_slots` to
  U = `row_capacity(N*K, n_slots)`), and `idx_NK` renumbered into that list, so that
  `table[rows_U][local_NK] == table[idx_NK]`. Ids must lie in [0, n_slots)."""
  rows_U, segment_J = _segments(idx_NK.reshape(-1), n_slots)
  return rows_U, segment_J.reshape(idx_NK.shape)


def merge_rows(
    rows: list[jax.Array], grads: list[jax.Array], n_slots: int
) -> tuple[jax.Array, jax.Array]:
  """One (rows_U, grads_UV) from several, each row listed once with its gradients summed in
  float32. A single list of distinct rows (one layer, one micro-batch) comes back as it is."""
  if len(rows) == 1:
    return rows[0], grads[0]
  ids_J = jnp.concatenate(rows)
  grads_JV = jnp.concatenate(grads).astype(jnp.float32)
  rows_U, segment_J = _segments(ids_J, n_slots + 1)  # padding (n_slots) merges into one entry
  merged_UV = jnp.zeros((rows_U.shape[0], grads_JV.shape[1]), jnp.float32).at[segment_J].add(
      grads_JV, mode="promise_in_bounds")
  rows_U = jnp.where(rows_U > n_slots, n_slots, rows_U)  # the list's own padding
  return rows_U, merged_UV
