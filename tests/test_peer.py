"""PEER (the reference's peer_variant): parity with the PyTorch oracle (output, selection and every
gradient) under every lookup impl, gradients only on the selected experts, init, and a PEER model's
train steps."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import precision
from memjax import config_loading
from memjax.config import ModelConfig, PEERConfig
from memjax.interop.torch_reference import OraclePEER, load_into_oracle, to_reference
from memjax.layers.peer import PEER

from support.lookup import IMPLS
from support.meshes import train_steps
from support.parity import build_random, oracle_grads, relative_error

DIM = 32
TOL = {"float32": 1e-5, "float64": 1e-6}
VARIANTS = {
    "base": dict(),  # H=2, K=4, M=16, k_dim=16
    "h4_k8_n32": dict(heads=4, knn=8, n_keys=32),
    "k1_n8_no_query_bias": dict(knn=1, n_keys=8, query_bias=False),
    "every_expert_k16_n16": dict(knn=16, n_keys=16, k_dim=8),
}

pytestmark = pytest.mark.usefixtures("fast_compile")


def make_config(dtype: str = "float32", dim: int = DIM, **peer) -> ModelConfig:
  peer = dict(layers=(0,), n_keys=16, heads=2, knn=4, k_dim=16) | peer
  return ModelConfig(dim=dim, n_layers=1, n_heads=4, dtype=dtype, param_dtype=dtype, peer=PEERConfig(**peer))


@nnx.jit
def forward_and_grads(layer, x_BTD, cot_BTD):
  loss = lambda layer, x_BTD: jnp.sum(layer(x_BTD) * cot_BTD)
  grads, dx_BTD = nnx.grad(loss, argnums=(0, 1))(layer, x_BTD)
  experts_NHK, _ = layer.select(x_BTD.reshape(-1, x_BTD.shape[-1]))
  return layer(x_BTD), grads, dx_BTD, experts_NHK


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "variant, dtype", [(v, "float32") for v in VARIANTS] + [("h4_k8_n32", "float64")]
)
def test_matches_oracle(variant, dtype, impl):
  rng = np.random.default_rng(2)
  x_BTD = rng.standard_normal((2, 5, DIM)).astype(dtype)
  cot_BTD = rng.standard_normal((2, 5, DIM)).astype(dtype)
  with precision(dtype):
    cfg = make_config(dtype, impl=impl, **VARIANTS[variant])
    layer = build_random(lambda: PEER(cfg, rngs=nnx.Rngs(0)), 0)
    # Pre-activations <x, u> of order 1: far in gelu's negative tail, float32 gradients underflow
    # to exactly 0 and the check below could not tell a missing gradient from a vanishing one.
    u = layer.values_u.embedding
    u.set_value(u[...] * DIM**-0.5)
    oracle = OraclePEER(cfg).to(getattr(torch, dtype))
    load_into_oracle(oracle, layer)
    out_BTD, grads, dx_BTD, experts_NHK = forward_and_grads(
        layer, jnp.asarray(x_BTD), jnp.asarray(cot_BTD)
    )
    ours = to_reference(grads)
  assert out_BTD.dtype == jnp.dtype(dtype)

  x_t = torch.from_numpy(x_BTD).requires_grad_(True)
  out_t = oracle(x_t)
  (out_t * torch.from_numpy(cot_BTD)).sum().backward()
  ref = oracle_grads(oracle)
  with torch.no_grad():
    _, experts_t = oracle.select(x_t.reshape(-1, DIM))

  np.testing.assert_array_equal(np.asarray(experts_NHK), experts_t.numpy())
  errors = {"output": relative_error(out_BTD, out_t), "d input": relative_error(dx_BTD, x_t.grad)}
  expected = ["keys", "query_proj.query_mlps.0.weight", "values_u.weight", "values_v.weight"]
  expected += ["query_proj.query_mlps.0.bias"] if cfg.peer.query_bias else []
  assert sorted(ours) == sorted(ref) == sorted(expected)
  errors |= {f"d {name}": relative_error(ours[name], ref[name]) for name in ref}
  assert max(errors.values()) <= TOL[dtype], errors

  # The expert tables get gradients on exactly the selected experts' rows.
  selected = np.zeros(cfg.peer.n_experts, bool)
  selected[np.asarray(experts_NHK).ravel()] = True
  for name in ("values_u.weight", "values_v.weight"):
    touched = np.abs(ours[name]).max(axis=1) > 0
    np.testing.assert_array_equal(touched, selected, err_msg=name)
  # With knn = 1 each head's softmax weight is constantly 1: keys and query get no gradient.
  no_grad = ("keys", "query_proj") if cfg.peer.knn == 1 else ()
  for name in ref:
    assert (np.abs(ours[name]).max() == 0) == name.startswith(no_grad), name


def test_parameter_names_and_shapes_are_the_references():
  cfg = make_config(heads=4)
  layer = nnx.eval_shape(lambda: PEER(cfg, rngs=nnx.Rngs(0)))
  shapes = {k: v.shape for k, v in to_reference(layer).items()}
  h, n, dk = 4, 16, 16
  assert shapes == {
      "keys": (2 * h * n, dk // 2),
      "query_proj.query_mlps.0.weight": (h * dk, DIM),
      "query_proj.query_mlps.0.bias": (h * dk,),
      "values_u.weight": (n * n, DIM),
      "values_v.weight": (n * n, DIM),
  }
  assert set(shapes) == set(OraclePEER(cfg).state_dict())


def test_init_statistics():
  d, k_dim = 256, 64
  params = to_reference(PEER(make_config(dim=d, k_dim=k_dim, n_keys=32), rngs=nnx.Rngs(0)))
  keys = params["keys"]
  assert np.abs(keys).max() <= k_dim**-0.5 and np.abs(keys).max() > 0.99 * k_dim**-0.5
  for name in ("values_u.weight", "values_v.weight"):
    assert abs(params[name].std() / d**-0.5 - 1) < 0.02, name
  assert not params["query_proj.query_mlps.0.bias"].any()


def test_peer_config_trains():
  cfg = config_loading.load(
      "tiny_peer",
      ["model.dim=32", "model.n_heads=2", "model.peer.n_keys=8", "model.peer.knn=4",
       "model.peer.k_dim=16", "train.batch_size=2", "train.seq_len=16", "optim.warmup=1"],
  )
  losses, metrics = train_steps(cfg, steps=4)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert "balance_loss" not in metrics
