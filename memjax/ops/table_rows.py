"""The rows of a table that a step touches: compact ids for a sparse table update.

A lookup reads at most N*K of the table's S rows. `compact_rows` lists the distinct ones (sorted,
padded to a size fixed by the shapes) and renumbers the lookup's ids into that list, so the bag
can read a compact (R, V) copy of those rows and its backward writes an (R, V) gradient in place
of an (S, V) one. `merge_rows` sums the gradients of repeated rows across several such lists (the
layers that share a table, the micro-batches of a step).

Padding entries hold the id S, one past the last row: a gather with mode="clip" reads a real row
for them (which no lookup uses) and a scatter with mode="drop" skips them. `set_rows` writes
updated rows back, through a lookup impl's kernel where it has one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.ops.dispatch import kernels


def set_rows(
    table_SV: jax.Array, rows_R: jax.Array, new_RV: jax.Array, impl: str = "xla",
    factor: jax.Array | None = None,
) -> jax.Array:
  """`table_SV` scaled by `factor` (a float32 scalar; float32 tables), with the distinct rows
  `rows_R` then replaced by `new_RV` (ids >= S skipped).

  `impl`'s kernel, where it has one, runs it on one device; on a mesh of several devices it is XLA's
  scatter, which the partitioner splits along the table's sharding.
  """
  kernel = kernels(impl).set_rows
  mesh = jax.sharding.get_abstract_mesh()
  if kernel is not None and (mesh.empty or mesh.size == 1):
    return kernel(table_SV, rows_R, new_RV, factor)
  if factor is not None:
    table_SV = (factor * table_SV.astype(jnp.float32)).astype(table_SV.dtype)
  return table_SV.at[rows_R].set(new_RV.astype(table_SV.dtype), mode="drop")


def row_capacity(n_ids: int, n_slots: int) -> int:
  """The compact list's length: no more rows than ids, nor than the table holds."""
  return max(min(n_ids, n_slots), 1)


def _segments(ids_E: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array]:
  """(rows_R, segment_E): the distinct ids in ascending order, padded with n_slots, and each
  id's position in that list."""
  n = ids_E.shape[0]
  order_E = jnp.argsort(ids_E, stable=True)
  sorted_E = ids_E[order_E]
  starts_E = jnp.concatenate([jnp.ones((1,), bool), sorted_E[1:] != sorted_E[:-1]])
  segment_sorted_E = jnp.cumsum(starts_E.astype(jnp.int32)) - 1
  capacity = row_capacity(n, n_slots)
  rows_R = jnp.full((capacity,), n_slots, jnp.int32).at[segment_sorted_E].set(
      sorted_E.astype(jnp.int32), mode="drop")
  segment_E = jnp.zeros((n,), jnp.int32).at[order_E].set(segment_sorted_E)
  return rows_R, segment_E


def compact_rows(idx_NK: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array]:
  """(rows_R, local_NK): the distinct row ids of `idx_NK` (ascending, padded with `n_slots` to
  R = `row_capacity(N*K, n_slots)`), and `idx_NK` renumbered into that list, so that
  `table[rows_R][local_NK] == table[idx_NK]`. Ids must lie in [0, n_slots)."""
  rows_R, segment_E = _segments(idx_NK.reshape(-1), n_slots)
  return rows_R, segment_E.reshape(idx_NK.shape)


def merge_rows(
    rows: list[jax.Array], grads: list[jax.Array], n_slots: int
) -> tuple[jax.Array, jax.Array]:
  """One (rows_R, grads_RV) from several, each row listed once with its gradients summed in
  float32. A single list of distinct rows (one layer, one micro-batch) comes back as it is."""
  if len(rows) == 1:
    return rows[0], grads[0]
  ids_E = jnp.concatenate(rows)
  grads_EV = jnp.concatenate(grads).astype(jnp.float32)
  rows_R, segment_E = _segments(ids_E, n_slots + 1)  # padding (n_slots) merges into one entry
  merged_RV = jnp.zeros((rows_R.shape[0], grads_EV.shape[1]), jnp.float32).at[segment_E].add(
      grads_EV, mode="promise_in_bounds")
  rows_R = jnp.where(rows_R > n_slots, n_slots, rows_R)  # the list's own padding
  return rows_R, merged_RV
