"""The memory layer: parity with the PyTorch oracle (output and every gradient), init statistics
(spec 1.5), dropout modes and qk-norm."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import precision
from memjax.config import MemoryConfig, ModelConfig
from memjax.interop.torch_reference import OracleMemory, load_into_oracle, to_reference
from memjax.layers.memory import ProductKeyMemory
from memjax.ops import product_topk

from support.parity import build_random, oracle_grads, relative_error

DIM = 32
# Error bound relative to each tensor's largest entry. float64 only reaches about 1e-7: the
# softmax runs in float32 on both sides (as in the reference), the bag accumulates in float32.
TOL = {"float32": 1e-5, "float64": 1e-6}

# Each output path (bag only, projection, Memory+, gate) over heads 2/4, knn 1/4/8/16 (up to
# knn = n_keys) and n_keys 8/16/32. Base: H=2, K=4, M=16, k_dim=16, V=D, Memory+.
VARIANTS = {
    "memory": dict(swilu=False),  # plain Memory: the bag is the output
    "memory_vdim_h4_k8_n32": dict(swilu=False, v_dim=24, heads=4, knn=8, n_keys=32),
    "memory_plus": dict(),
    "memory_plus_vdim_h4_k16_n32": dict(v_dim=48, heads=4, knn=16, n_keys=32),
    "gated_h4": dict(gated=True, heads=4),
    "k1_n8_no_query_bias": dict(knn=1, n_keys=8, query_bias=False),
    "gated_k16_n16": dict(gated=True, knn=16, n_keys=16, k_dim=8, v_dim=24),  # every sub-key
    # k_dim large next to n_keys: memjax may score x against W_q K^T without forming the query.
    "wide_keys_n8": dict(k_dim=64, n_keys=8),
}
F64_VARIANTS = (
    "memory", "memory_vdim_h4_k8_n32", "memory_plus_vdim_h4_k16_n32", "gated_h4", "wide_keys_n8"
)

pytestmark = pytest.mark.usefixtures("fast_compile")


def make_config(dtype: str = "float32", dim: int = DIM, **memory) -> ModelConfig:
  mem = dict(layers=(0,), n_keys=16, heads=2, knn=4, k_dim=16, value_dtype=dtype) | memory
  return ModelConfig(
      dim=dim, n_layers=1, n_heads=4, dtype=dtype, param_dtype=dtype, memory=MemoryConfig(**mem)
  )


def build_pair(cfg: ModelConfig, seed: int = 0):
  """A memjax layer with random weights (non-zero biases) and an oracle holding the same."""
  layer = build_random(lambda: ProductKeyMemory(cfg, rngs=nnx.Rngs(0)), seed)
  oracle = OracleMemory(cfg).to(getattr(torch, cfg.dtype))
  load_into_oracle(oracle, layer)
  return layer, oracle


@nnx.jit
def forward_and_grads(layer, x_BTD, cot_BTD):
  """Output, gradients of <output, cot> (parameters and input), and the selection."""
  loss = lambda layer, x_BTD: jnp.sum(layer(x_BTD) * cot_BTD)
  grads, dx_BTD = nnx.grad(loss, argnums=(0, 1))(layer, x_BTD)
  slots_NHK, weights_NHK = layer.select(x_BTD.reshape(-1, x_BTD.shape[-1]))
  return layer(x_BTD), grads, dx_BTD, slots_NHK, weights_NHK


@pytest.mark.parametrize(
    "variant, dtype",
    [(v, "float32") for v in VARIANTS] + [(v, "float64") for v in F64_VARIANTS],
)
def test_matches_oracle(variant, dtype):
  rng = np.random.default_rng(1)
  x_BTD = rng.standard_normal((2, 5, DIM)).astype(dtype)
  cot_BTD = rng.standard_normal((2, 5, DIM)).astype(dtype)
  with precision(dtype):
    cfg = make_config(dtype, **VARIANTS[variant])
    layer, oracle = build_pair(cfg)
    out_BTD, grads, dx_BTD, slots_NHK, weights_NHK = forward_and_grads(
        layer, jnp.asarray(x_BTD), jnp.asarray(cot_BTD)
    )
    ours = to_reference(grads)
  assert out_BTD.dtype == dx_BTD.dtype == jnp.dtype(dtype)

  x_t = torch.from_numpy(x_BTD).requires_grad_(True)
  out_t = oracle(x_t)
  (out_t * torch.from_numpy(cot_BTD)).sum().backward()
  ref = oracle_grads(oracle)
  with torch.no_grad():
    scores_t, slots_t = oracle.select(x_t.reshape(-1, DIM))

  # Random float inputs make ties negligible: the same slots, in the same order.
  np.testing.assert_array_equal(np.asarray(slots_NHK), slots_t.numpy())
  errors = {
      "weights": relative_error(weights_NHK, torch.softmax(scores_t.float(), -1)),
      "output": relative_error(out_BTD, out_t),
      "d input": relative_error(dx_BTD, x_t.grad),
  }
  assert sorted(ours) == sorted(ref)
  errors |= {f"d {name}": relative_error(ours[name], ref[name]) for name in ref}
  assert max(errors.values()) <= TOL[dtype], errors
  # With knn = 1 the softmax weight is constantly 1, so keys and query get no gradient at all;
  # otherwise every parameter gets one.
  no_grad = ("keys", "query_proj") if cfg.memory.knn == 1 else ()
  for name in ref:
    assert (np.abs(ref[name]).max() == 0) == name.startswith(no_grad), name
    assert (np.abs(ours[name]).max() == 0) == name.startswith(no_grad), name


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_parameter_dtypes_follow_the_config(dtype):
  with precision(dtype):
    cfg = dataclasses.replace(make_config(dtype), dtype="float32")
    layer = nnx.eval_shape(lambda: ProductKeyMemory(cfg, rngs=nnx.Rngs(0)))
    dtypes = {k: v.dtype for k, v in to_reference(layer).items()}
  assert set(dtypes.values()) == {jnp.dtype(dtype)}, dtypes


def test_parameter_names_and_shapes_are_the_references():
  cfg = make_config(v_dim=24, gated=True, heads=4)
  layer = nnx.eval_shape(lambda: ProductKeyMemory(cfg, rngs=nnx.Rngs(0)))
  shapes = {k: v.shape for k, v in to_reference(layer).items()}
  h, n, dk, v = 4, 16, 16, 24
  assert shapes == {
      "keys": (2 * h * n, dk // 2),
      "query_proj.query_mlps.0.weight": (h * dk, DIM),
      "query_proj.query_mlps.0.bias": (h * dk,),
      "swilu_projection.weight": (v, DIM),
      "swilu_projection.bias": (v,),
      "value_proj.weight": (DIM, v),
      "value_proj.bias": (DIM,),
      "gating.weight": (1, DIM),
      "gating.bias": (1,),
      "values.weight": (n * n, v),
  }
  assert set(shapes) == set(OracleMemory(cfg).state_dict())


def test_init_statistics():
  d, v, heads, k_dim, n_keys = 256, 48, 4, 64, 64
  cfg = make_config(dim=d, v_dim=v, heads=heads, k_dim=k_dim, n_keys=n_keys, gated=True)
  params = to_reference(ProductKeyMemory(cfg, rngs=nnx.Rngs(0)))

  def check_uniform(w, bound):
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.std() / (bound / 3**0.5) - 1) < 0.03 and abs(w.mean()) < 0.02 * bound

  def check_normal(w, std, rel):
    assert abs(w.std() / std - 1) < rel and abs(w.mean()) < rel * std

  check_uniform(params["keys"], k_dim**-0.5)  # the full k_dim, not the half
  check_uniform(params["query_proj.query_mlps.0.weight"], (6 / (d + heads * k_dim)) ** 0.5)
  values = params["values.weight"]
  check_normal(values, v**-0.5, 0.01)
  assert np.abs(values).max() > 3.5 * v**-0.5  # a plain normal, not truncated at 3 sigma
  check_normal(params["value_proj.weight"], d**-0.5, 0.05)
  check_normal(params["swilu_projection.weight"], d**-0.5, 0.05)  # the output dim, = D
  check_normal(params["gating.weight"], d**-0.5, 0.2)  # only D samples
  for name, w in params.items():
    if name.endswith("bias"):
      assert not w.any(), name


def test_dropout_only_in_train_mode():
  base = build_random(lambda: ProductKeyMemory(make_config(), rngs=nnx.Rngs(0)), 0)
  cfg = make_config(input_dropout=0.3, query_dropout=0.3, value_dropout=0.3)
  layer = build_random(lambda: ProductKeyMemory(cfg, rngs=nnx.Rngs(0)), 0)
  x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, DIM)), jnp.float32)
  expected = base(x_BTD)

  layer.eval()
  np.testing.assert_allclose(layer(x_BTD), expected, rtol=1e-6, atol=1e-7)
  layer.train()
  first, second = layer(x_BTD), layer(x_BTD)
  assert not np.allclose(first, expected) and not np.allclose(first, second)
  layer.eval()
  np.testing.assert_allclose(layer(x_BTD), expected, rtol=1e-6, atol=1e-7)


def test_qk_norm_runs_and_changes_the_output():
  # qk-norm is the paper's, not the reference code's: no oracle, only a sanity check.
  cfg = make_config(heads=4)
  qk_cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, qk_norm=True))
  plain = build_random(lambda: ProductKeyMemory(cfg, rngs=nnx.Rngs(0)), 0)
  normed = build_random(lambda: ProductKeyMemory(qk_cfg, rngs=nnx.Rngs(0)), 0)
  x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, DIM)), jnp.float32)
  out, grads, _, _, _ = forward_and_grads(normed, x_BTD, x_BTD)
  assert out.shape == x_BTD.shape and np.isfinite(out).all()
  assert not np.allclose(out, forward_and_grads(plain, x_BTD, x_BTD)[0], atol=1e-3)
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in to_reference(grads).values())


def differentiate_every_score(layer, x_ND):
  """The selection as the reference differentiates it: through all 2 x M sub-key scores."""
  n, keys = x_ND.shape[0], layer.product_keys
  scores_NH2M = keys.half_scores(x_ND)
  scores_RK, slots_RK = product_topk(
      scores_NH2M[:, :, 0].reshape(n * keys.heads, -1),
      scores_NH2M[:, :, 1].reshape(n * keys.heads, -1),
      keys.knn,
  )
  shape = (n, keys.heads, keys.knn)
  return slots_RK.reshape(shape), jax.nn.softmax(scores_RK, axis=-1).reshape(shape)


@pytest.mark.parametrize(
    "memory",
    [dict(), dict(qk_norm=True), dict(query_dropout=0.3), dict(k_dim=64, n_keys=8)],
    ids=["plain", "qk_norm", "query_dropout", "folded_query"],
)
def test_the_selection_gradient_equals_differentiating_every_sub_key_score(memory):
  layer = build_random(lambda: ProductKeyMemory(make_config(**memory), rngs=nnx.Rngs(0)), 0)
  layer.train()  # query dropout draws a mask; both copies below draw the same one
  rng = np.random.default_rng(2)
  x_ND = jnp.asarray(rng.standard_normal((10, DIM)), jnp.float32)
  cot_NHK = jnp.asarray(
      rng.standard_normal((10, layer.product_keys.heads, layer.product_keys.knn)), jnp.float32
  )

  def grads(select, layer):
    loss = lambda layer, x_ND: jnp.sum(select(layer, x_ND)[1] * cot_NHK)
    return nnx.grad(loss, argnums=(0, 1))(layer, x_ND), select(layer, x_ND)

  (ours, dx_ours), (slots, weights) = grads(lambda m, x: m.select(x), nnx.clone(layer))
  (ref, dx_ref), (ref_slots, ref_weights) = grads(differentiate_every_score, nnx.clone(layer))

  np.testing.assert_array_equal(slots, ref_slots)
  np.testing.assert_array_equal(weights, ref_weights)  # the values are the full scores'
  ours, ref = to_reference(ours), to_reference(ref)
  errors = {name: relative_error(ours[name], ref[name]) for name in ref}
  errors["d input"] = relative_error(dx_ours, dx_ref)
  assert max(errors.values()) <= 1e-6, errors
  assert np.abs(ours["keys"]).max() > 0 and np.abs(dx_ours).max() > 0
