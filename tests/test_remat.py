"""model.remat: what the backward recomputes instead of keeping. It changes memory and time, never
values: a train step with it equals one without (loss, every gradient, the state after it) for
memory, MoE and PEER models in both table-gradient forms, and so does a run; it lowers the
compiled step's temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import aot, config, config_loading, optim, sharding
from memjax.training import loop, state as state_lib, step as step_lib

from support.tpu import needs_libtpu
from support.training import logged, smoke_config

# Each model has a memory layer, so that both table-gradient forms apply, with dropout on all its
# three sites (RNG counts advance inside the recomputed blocks); beside it an MoE layer, whose
# balance loss is captured from inside a block, or a PEER layer.
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.n_keys=16",
    "model.memory.knn=4", "model.memory.heads=2", "model.memory.k_dim=32",
    "model.memory.input_dropout=0.1", "model.memory.query_dropout=0.1",
    "model.memory.value_dropout=0.1", "model.max_seqlen=64", "train.batch_size=4",
    "train.seq_len=16", "optim.warmup=0",
]
MODELS = {
    "memory": ["model.memory.layers=[0,1]"],
    "moe": ["model.memory.layers=[0]", "model.moe.layers=[1]", "model.moe.experts=4",
            "model.moe.hidden_dim=32", "model.moe.block=8"],
    "peer": ["model.memory.layers=[0]", "model.peer.layers=[1]", "model.peer.n_keys=8",
             "model.peer.knn=4", "model.peer.k_dim=16"],
}
REMATS = ["attention", "block"]


def one_step(model: str, remat: str, rows: bool):
  """The state after one train step of `model` (the gradient in Adam's first moment: 0.1 times
  the clipped gradient), and its metrics."""
  cfg = config_loading.load("tiny", [*SMALL, *MODELS[model], f"model.remat={remat}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (4, 17)), jnp.int32)
  with jax.set_mesh(mesh):
    state = state_lib.create_state(cfg, mesh)
    schedule = optim.config_lr_multiplier(cfg)
    train_step = jax.jit(step_lib.make_train_step(
        cfg, state_lib.model_graphdef(cfg), optim.make_optimizer(cfg),
        lambda step: cfg.optim.lr * schedule(step), rows))
    return jax.device_get(train_step(state, tokens))


def plain(x):
  """An array for numpy: a PRNG key as its data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


_WITHOUT = {}


@pytest.mark.usefixtures("fast_compile")
@pytest.mark.parametrize("rows", [False, True], ids=["dense_grads", "row_grads"])
@pytest.mark.parametrize("remat", REMATS)
@pytest.mark.parametrize("model", MODELS)
def test_a_step_with_remat_equals_the_step_without(model, remat, rows):
  key = (model, rows)
  if key not in _WITHOUT:
    _WITHOUT[key] = one_step(model, "none", rows)
  want_state, want_metrics = _WITHOUT[key]
  state, metrics = one_step(model, remat, rows)
  assert set(metrics) == set(want_metrics)
  for name, value in metrics.items():
    np.testing.assert_allclose(value, want_metrics[name], rtol=1e-6, err_msg=name)
  assert metrics["finite"]
  if model == "moe":
    assert metrics["balance_loss"] > 0
  got, want = jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(want_state)
  assert len(got) == len(want)
  # The RNG counts (dropout drew the same masks) and both Adam moments (each gradient) to float32
  # rounding. Adam's first step moves a parameter by lr * g / (|g| + eps): where |g| is near eps,
  # that rounding moves it by up to 1e-3 of lr.
  for (path, a), b in zip(got, want):
    name = jax.tree_util.keystr(path)
    atol = 1e-5 if name.startswith(".params") else 1e-7
    np.testing.assert_allclose(plain(a), plain(b), rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.usefixtures("fast_compile")
def test_the_eval_step_records_the_same_selections_from_recomputed_blocks():
  results = []
  for remat in ("none", "block"):
    cfg = config_loading.load("tiny", [*SMALL, *MODELS["memory"], f"model.remat={remat}"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (4, 17)), jnp.int32)
    with jax.set_mesh(mesh):
      state = state_lib.create_state(cfg, mesh)
      eval_step = jax.jit(step_lib.make_eval_step(cfg, state_lib.model_graphdef(cfg)))
      results.append(jax.device_get(eval_step(state.params, state.other, tokens)))
  (want_loss, _, want), (loss, _, got) = results
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(want)) == 4  # 2 layers' slots, weights
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_run_with_remat_logs_the_run_without(tmp_path, data_dir):
  """Steps, evals (the eval records each memory layer's selection from inside its block) and the
  memory diagnostics."""
  runs = {}
  for remat in ("none", "block"):
    cfg = smoke_config(data_dir, "train.steps=4", "train.eval_every=2",
                       "model.memory.value_dropout=0.1", f"model.remat={remat}")
    loop.run(cfg, tmp_path / remat, log=lambda _: None)
    runs[remat] = tmp_path / remat
  for key in ("train/loss", "eval/loss"):
    want = logged(runs["none"], key)
    assert want and logged(runs["block"], key).keys() == want.keys()
    np.testing.assert_allclose(list(logged(runs["block"], key).values()), list(want.values()),
                               rtol=1e-5, err_msg=key)


def temporaries(remat: str) -> int:
  """Bytes of temporaries per chip of the train step compiled for a v5e-4 (memjax.aot), of a
  model whose attention probabilities dominate: one sequence of 512 tokens per chip, 4 heads.
  (XLA's CPU compiler keeps every activation live through the backward whatever remat says: its
  figures would not show it.)"""
  cfg = config_loading.load("tiny", [
      "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.memory.layers=[1]",
      "model.memory.impl=xla", "model.max_seqlen=512", "train.batch_size=4",
      "train.seq_len=512", f"model.remat={remat}"])
  return aot.compile_for(cfg, "v5e-4")["temp_bytes"]


@needs_libtpu
def test_remat_lowers_the_compiled_temporaries():
  none, attention, block = map(temporaries, ["none", "attention", "block"])
  probs = 4 * 512 * 512 * 4  # one block's float32 probabilities, 4 MiB
  assert attention <= none - probs and block <= none - probs, (none, attention, block)


def test_a_bad_remat_names_the_field():
  with pytest.raises(config.ConfigError, match=r"^model.remat: must be one of 'none', "):
    config_loading.load("tiny", ["model.remat=full"])
  assert config.ModelConfig().remat == "none"  # the default: every result as before remat
