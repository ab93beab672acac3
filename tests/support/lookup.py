"""Lookup impls as test parameters, random lookup cases, and the float tolerances they are
checked to. Every impl comes from `pallas_kernels.impls.IMPLS`: a new entry is tested here with
no test edited."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import dispatch, unavailable_reason
from memjax.sharding import AXES, MEMORY
from pallas_kernels import impls

# float32 sums in another order than the reference: a few ulps of the terms' magnitude (the
# result itself can be far smaller when signed terms cancel).
F32_REL = 1e-5


def _param(impl: impls.Impl):
  marks = [getattr(pytest.mark, impl.platform)] if impl.platform in ("gpu", "tpu") else []
  reason = unavailable_reason(impl.name)
  if reason is not None:
    marks.append(pytest.mark.skip(reason=f"{impl.name} kernels unavailable: {reason}"))
  return pytest.param(impl.name, marks=marks, id=impl.name)


# Every impl, skipped where its kernels cannot run (marked with the platform they are built for).
ALL_IMPLS = tuple(_param(impl) for impl in impls.IMPLS)
# The twin and the impl built for this backend: what layer- and model-level tests run, since
# another platform's kernels would only run their interpreter here.
IMPLS = tuple(
    _param(impl) for impl in impls.IMPLS if impl.platform in (None, jax.default_backend())
)


def random_case(seed, slots, dim, tokens, bag, dup_pool=None, dtype=jnp.float32, *,
                w_dtype=jnp.float32, signed=False, out_of_range=False, edge_rows=False):
  """(values_SV, idx_NK, w_NK, dout_NV): ids uniform over the table, or over `dup_pool` rows of
  it (every bag then repeats rows); weights uniform in [0, 1), or standard normal (`signed`), in
  `w_dtype` as the output gradient is (the model's bag reads its softmax weights in the compute
  dtype). `out_of_range` replaces an eighth of the ids by ids outside [0, S); `edge_rows` makes
  the first two ids the first and last rows."""
  rng = np.random.default_rng(seed)
  pool = np.arange(slots) if dup_pool is None else rng.choice(slots, size=dup_pool)
  idx = rng.choice(pool, size=(tokens, bag)).astype(np.int32)
  if out_of_range:
    n = max(1, idx.size // 8)
    idx.flat[rng.choice(idx.size, size=n, replace=False)] = rng.choice(
        [-3, -1, slots, slots + 7], size=n)
  if edge_rows:
    idx.flat[: min(2, idx.size)] = [0, slots - 1][: min(2, idx.size)]
  values = jnp.asarray(rng.standard_normal((slots, dim)), dtype)
  draw = rng.standard_normal if signed else rng.random
  weights = jnp.asarray(draw((tokens, bag)), w_dtype)
  dout = jnp.asarray(rng.standard_normal((tokens, dim)), w_dtype)
  return values, jnp.asarray(idx), weights, dout


def naive_bag(values_SV, idx_NK, w_NK):
  """The materialised gather and sum the impls replace (traceable)."""
  rows_NKV = values_SV[idx_NK].astype(jnp.float32)
  return jnp.einsum("nk,nkv->nv", w_NK.astype(jnp.float32), rows_NKV, precision="highest")


def reference(values_SV, idx_NK, w_NK, dout_NV):
  """float64 forward, table gradient and weight gradient, on the host; out-of-range ids read the
  clamped row and get no table gradient."""
  v = np.asarray(values_SV, np.float64)
  idx, w, dout = np.asarray(idx_NK), np.asarray(w_NK, np.float64), np.asarray(dout_NV, np.float64)
  rows = np.clip(idx, 0, v.shape[0] - 1)
  in_range = (idx >= 0) & (idx < v.shape[0])
  out = np.einsum("nk,nkv->nv", w, v[rows])
  dvalues = np.zeros_like(v)
  np.add.at(dvalues, rows[in_range], (w[..., None] * dout[:, None, :])[in_range])
  dw = np.einsum("nv,nkv->nk", dout, v[rows])
  return out, dvalues, dw


def term_scales(values_SV, idx_NK, w_NK, dout_NV):
  """Per entry of the output, the table gradient and the weight gradient: the magnitude of the
  terms summed into it. Sums of signed terms may cancel far below it, so errors are measured
  against it."""
  abs_ = lambda x: np.abs(np.asarray(x, np.float64))
  return reference(abs_(values_SV), idx_NK, abs_(w_NK), abs_(dout_NV))


def assert_close(actual, expected, rel, scale=None):
  """|actual - expected| <= rel * scale (per entry or one number; default max |expected|), or one
  step of `actual`'s smallest (subnormal) spacing; NaNs (an unwritten, poisoned entry) fail."""
  tiny = float(jnp.finfo(jnp.asarray(actual).dtype).smallest_subnormal)
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert not np.isnan(actual).any(), "unwritten (NaN-poisoned) or NaN entries"
  if scale is None:
    scale = np.abs(expected).max(initial=0.0)
  excess = np.abs(actual - expected) - (rel * np.asarray(scale, np.float64) + tiny)
  assert not (excess > 0).any(), (
      f"{int((excess > 0).sum())} entries off, worst by {excess.max():.3g} beyond {rel:.1g} x scale")


def impls_providing(*kernels: str, xla: bool = False):
  """Params of the impls that bring their own kernel for one of `kernels` (`Kernels` fields),
  and, skipped, those unavailable here; with the `xla` twin too when its XLA path is itself
  under test (`xla`)."""

  def provides(impl: impls.Impl) -> bool:
    if impl.name == "xla":
      return xla
    if unavailable_reason(impl.name) is not None:
      return True
    loaded = dispatch.kernels(impl.name)
    return any(getattr(loaded, kernel) is not None for kernel in kernels)

  return tuple(_param(impl) for impl in impls.IMPLS if provides(impl))


def explicit_mesh(shape, devices=None):
  """A (data, fsdp, memory) mesh of `shape` over the test devices, or over `devices`."""
  return jax.make_mesh(shape, AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Explicit,) * len(AXES))


def placed(mesh, values_SV, *token_arrays):
  """The table's columns split over the memory axis; every token-indexed array over all axes."""
  P, put = jax.sharding.PartitionSpec, jax.device_put
  tokens = jax.sharding.NamedSharding(mesh, P(AXES))
  return (put(values_SV, jax.sharding.NamedSharding(mesh, P(None, MEMORY))),
          *(put(a, tokens) for a in token_arrays))
