"""The MoE baseline: routing, the load-balancing loss, dropless dispatch against a dense per-token
reference (both grouped-matmul impls, under jit), gradients only to the selected experts, the
balance loss in the training loss, parameter counts, config checks and a model's train steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config_loading
from memjax.config import ConfigError, MoEConfig, ModelConfig
from memjax.layers import moe
from memjax.model import Transformer, balance_loss, parameter_counts
from memjax.training import step as step_lib

from support.meshes import train_steps

pytestmark = pytest.mark.usefixtures("fast_compile")


def random_experts(n=24, d=8, f=12, e=5, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)
  return jnp.asarray(rng.standard_normal((n, d)), jnp.float32), normal(e, d, f), normal(e, d, f), normal(e, f, d)


def dense_reference(x_ND, experts_NK, gates_NK, w1, w3, w2):
  """Every token through its experts one by one (numpy, float64)."""
  x, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x_ND, w1, w3, w2))
  out = np.zeros_like(x)
  for n in range(x.shape[0]):
    for e, g in zip(np.asarray(experts_NK[n]), np.asarray(gates_NK[n], np.float64)):
      h = x[n] @ w1[e]
      out[n] += g * (((h / (1 + np.exp(-h))) * (x[n] @ w3[e])) @ w2[e])
  return out


def test_route_picks_the_top_k_and_renormalises():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((50, 7)), jnp.float32)
  experts, gates, _ = moe.route(logits, 3)
  probs = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_array_equal(experts, np.argsort(-probs, axis=1)[:, :3])
  top = np.take_along_axis(probs, np.asarray(experts), 1)
  np.testing.assert_allclose(gates, top / top.sum(1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_balance_loss_values(top_k):
  e, n = 8, 64
  # A uniform router: 1 exactly, whichever experts the ties pick.
  _, _, uniform = moe.route(jnp.zeros((n, e)), top_k)
  assert float(uniform) == pytest.approx(1.0, abs=1e-6)
  # Every token certain of expert 0: E (top-1); its k-1 runners-up have probability ~0.
  sure = jnp.zeros((n, e)).at[:, 0].set(50.0)
  assert float(moe.route(sure, top_k)[2]) == pytest.approx(e / top_k, rel=1e-5)
  # Random logits: E * sum_e f_e p_e by hand.
  logits = np.random.default_rng(top_k).standard_normal((n, e)).astype(np.float32)
  experts, _, loss = moe.route(jnp.asarray(logits), top_k)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  share = np.bincount(np.asarray(experts).ravel(), minlength=e) / (n * top_k)
  assert float(loss) == pytest.approx(e * np.sum(share * probs.mean(0)), rel=1e-5)


@pytest.mark.parametrize("impl, block", [("ragged", 0), ("blocked", 1), ("blocked", 4), ("blocked", 64)])
@pytest.mark.parametrize("skewed", [False, True])
def test_dispatch_equals_dense_reference(impl, block, skewed):
  x, w1, w3, w2 = random_experts()
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((x.shape[0], 5)), jnp.float32)
  if skewed:  # most tokens to expert 3, none to expert 0 or 4: empty and full groups
    logits = logits.at[:20, 3].add(10.0).at[:, 0].add(-10.0).at[:, 4].add(-10.0)
  experts, gates, _ = moe.route(logits, 2)
  run = jax.jit(lambda *a: moe.dispatch(*a, impl=impl, block=block))
  out = run(x, experts, gates, w1, w3, w2)
  np.testing.assert_allclose(out, dense_reference(x, experts, gates, w1, w3, w2), rtol=1e-5, atol=1e-5)


def test_gradients_reach_exactly_the_selected_experts():
  x, w1, w3, w2 = random_experts(n=6, e=10)
  logits = jnp.asarray(np.random.default_rng(3).standard_normal((6, 10)), jnp.float32)
  experts, gates, _ = moe.route(logits, 2)
  selected = np.zeros(10, bool)
  selected[np.asarray(experts).ravel()] = True
  assert 0 < selected.sum() < 10  # some experts idle, so "only those" is tested
  for impl, block in (("ragged", 0), ("blocked", 4)):
    loss = lambda w1, w3, w2: jnp.sum(moe.dispatch(x, experts, gates, w1, w3, w2, impl=impl, block=block) ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w1, w3, w2)
    for g in grads:
      touched = np.abs(np.asarray(g)).reshape(10, -1).max(1) > 0
      np.testing.assert_array_equal(touched, selected, err_msg=impl)


def test_impls_agree_on_outputs_and_gradients():
  x, w1, w3, w2 = random_experts(n=40, e=6, seed=4)
  logits = jnp.asarray(np.random.default_rng(4).standard_normal((40, 6)), jnp.float32)

  def run(impl, block):
    def loss(x, w1, w3, w2, logits):
      experts, gates, _ = moe.route(logits, 2)
      return jnp.sum(jnp.sin(moe.dispatch(x, experts, gates, w1, w3, w2, impl=impl, block=block)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w1, w3, w2, logits)

  (ragged, g_ragged), (blocked, g_blocked) = run("ragged", 0), run("blocked", 8)
  np.testing.assert_allclose(blocked, ragged, rtol=1e-5)
  for a, b in zip(g_blocked, g_ragged):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  assert np.abs(g_ragged[4]).max() > 0  # the router learns through the gates


def moe_model_config(**moe_fields) -> ModelConfig:
  fields = dict(layers=(1,), experts=4, top_k=2, hidden_dim=16) | moe_fields
  return ModelConfig(dim=16, n_layers=2, n_heads=2, vocab_size=64, moe=MoEConfig(**fields))


def recorded_balance_loss(model, tokens):
  view = nnx.view(model, record_balance_loss=True, raise_if_not_found=False)
  logits, intermediates = nnx.capture(view, nnx.Intermediate)(tokens)
  return logits, balance_loss(intermediates)


def test_layer_records_its_balance_loss_only_in_a_view_that_asks():
  model = Transformer(moe_model_config(), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  logits, loss = recorded_balance_loss(model, tokens)
  assert 1.0 <= float(loss) <= 4.0  # between uniform use and one expert
  np.testing.assert_allclose(model(tokens), logits, rtol=1e-6)  # a plain call gives the same
  assert not nnx.state(model, nnx.Intermediate)  # and records nothing
  assert float(balance_loss(nnx.capture(model, nnx.Intermediate)(tokens)[1])) == 0  # nor captured
  dense = Transformer(moe_model_config(layers=()), rngs=nnx.Rngs(0))
  assert float(recorded_balance_loss(dense, tokens)[1]) == 0


def test_balance_coefficient_reaches_the_training_loss():
  cfg = moe_model_config()
  graphdef, params, other = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
  grad = jax.jit(
      jax.grad(lambda p, c: step_lib._loss(graphdef, p, other, tokens, c), has_aux=True),
      static_argnums=1,
  )
  (total0, (_, ce0, bal0)) = step_lib._loss(graphdef, params, other, tokens, 0.0)
  (total1, (_, ce1, bal1)) = step_lib._loss(graphdef, params, other, tokens, 0.5)
  assert float(total0) == pytest.approx(float(ce0)) and float(ce0) == pytest.approx(float(ce1))
  assert float(total1) == pytest.approx(float(ce1) + 0.5 * float(bal1), rel=1e-6)
  router = lambda g: np.asarray(g["layers"][1]["feed_forward"]["router"]["kernel"][...])
  g0, g1 = router(grad(params, 0.0)[0]), router(grad(params, 0.5)[0])
  assert not np.allclose(g0, g1)  # the balance term moves the router


def test_parameter_counts_total_and_active():
  cfg = moe_model_config(experts=4, top_k=2, hidden_dim=16)
  counts = parameter_counts(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  dense = parameter_counts(nnx.eval_shape(lambda: Transformer(moe_model_config(layers=()), rngs=nnx.Rngs(0))))
  assert dense["total"] == dense["active"]
  ffn = 3 * 16 * cfg.ffn_hidden_dim
  experts = 4 * 3 * 16 * 16
  router = 16 * 4
  assert counts["total"] == dense["total"] - ffn + experts + router
  assert counts["active"] == counts["total"] - experts + 2 * 3 * 16 * 16


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match=r"^model.moe.top_k: must be in \[1, experts=4\], got 5"):
    config_loading.load("tiny", ["model.memory.layers=[]", "model.moe.layers=[1]", "model.moe.experts=4", "model.moe.top_k=5"])
  with pytest.raises(ConfigError, match=r"^model.moe.layers: blocks \[1\] are already in memory.layers"):
    config_loading.load("tiny", ["model.moe.layers=[0,1]"])
  with pytest.raises(ConfigError, match=r"^model.moe.impl: must be one of"):
    config_loading.load("tiny", ["model.moe.impl=dense"])
  with pytest.raises(ConfigError, match=r"^model.peer.layers: block indices must be in \[0, n_layers=4\)"):
    config_loading.load("tiny", ["model.peer.layers=[4]"])


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_moe_config_trains(impl):
  cfg = config_loading.load(
      "tiny_moe",
      ["model.dim=32", "model.n_heads=2", "model.moe.hidden_dim=32", f"model.moe.impl={impl}",
       "model.moe.block=8", "train.batch_size=2", "train.seq_len=16", "optim.warmup=1"],
  )
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=64))
  losses, metrics = train_steps(cfg, steps=4)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert 1.0 <= float(metrics["balance_loss"]) <= 2 * cfg.model.moe.experts / cfg.model.moe.top_k
