"""optim.table_update=sparse: the rows a step touches, their gradients and a row-wise AdamW; equal
to the dense update where the two agree by construction, on every mesh and lookup impl."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from memjax import config, config_loading, sharding
from memjax.layers.memory import SELECTION
from memjax.ops.table_rows import compact_rows, merge_rows, row_capacity
from memjax.training import loop, state as state_lib, step as step_lib

from support.lookup import ALL_IMPLS
from support.meshes import MESHES, X64, assert_close, cfg_for, run_steps
from support.training import logged, smoke_config

pytestmark = pytest.mark.usefixtures("fast_compile_module")

# A table of 2^14 rows of which one step reads a few hundred: most rows are untouched.
SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.layers=[0,1]",
    "model.memory.n_keys=128", "model.memory.knn=4", "model.memory.heads=2",
    "model.memory.k_dim=32", "model.max_seqlen=64", "train.batch_size=4", "train.seq_len=16",
    "optim.warmup=0", "optim.weight_decay=0",
]


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 60), st.randoms(use_true_random=False))
def test_compact_rows_list_each_touched_row_once_and_renumber_the_ids(n, k, n_slots, rnd):
  idx = np.array([[rnd.randrange(n_slots) for _ in range(k)] for _ in range(n)], np.int32)
  rows, local = map(np.asarray, compact_rows(jnp.asarray(idx), n_slots))
  distinct = np.unique(idx)
  assert rows.shape == (row_capacity(n * k, n_slots),)
  np.testing.assert_array_equal(rows[: len(distinct)], distinct)
  assert (rows[len(distinct):] == n_slots).all()
  np.testing.assert_array_equal(rows[local], idx)


def test_merged_rows_sum_the_gradients_of_repeated_rows():
  rows = [jnp.array([1, 4, 9, 10]), jnp.array([0, 4, 10, 10])]  # 10: padding of a 10-row table
  grads = [jnp.arange(8.0).reshape(4, 2), 10 * jnp.ones((4, 2))]
  merged_rows, merged = merge_rows(rows, grads, 10)
  want = np.zeros((10, 2))
  for r, g in zip(rows, grads):
    np.add.at(want, np.minimum(r, 9), np.where(np.asarray(r)[:, None] < 10, g, 0))
  dense = np.zeros((10, 2))
  live = np.asarray(merged_rows) < 10
  np.add.at(dense, np.asarray(merged_rows)[live], np.asarray(merged)[live])
  np.testing.assert_array_equal(dense, want)
  assert sorted(np.asarray(merged_rows)[live]) == [0, 1, 4, 9]


# In float64: in float32 the two updates' sums run in different orders, and where a coordinate's
# gradient is near Adam's eps that rounding moves its step by a visible fraction (test_sharding).
F64 = [*X64, "model.memory.value_dtype=float64"]


def steps(overrides, table_update, tokens, rows=None, n_steps=1):
  """(state before, after `n_steps` on `tokens`, the last metrics, the table rows the step
  reads), with the tables' gradient as `rows` or an (S, V) array (default: the step's choice)."""
  cfg = config_loading.load("tiny", [*SMALL, *overrides, f"optim.table_update={table_update}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), jax.enable_x64(cfg.model.param_dtype == "float64"):
    state = state_lib.create_state(cfg, mesh)
    before, touched = jax.device_get(state), touched_rows(cfg, state, tokens)
    train_step, _ = step_lib.jit_train_step(cfg, mesh, rows)
    for _ in range(n_steps):
      state, metrics = train_step(state, tokens)
  return before, jax.device_get(state), metrics, touched


def one_step(overrides, table_update, tokens, rows=None):
  """(parameters before, after one step, its metrics, the table rows the step reads)."""
  before, after, metrics, touched = steps(overrides, table_update, tokens, rows)
  return before.params, after.params, metrics, touched


def touched_rows(cfg, state, tokens):
  """The table rows that any memory layer reads for `tokens`."""
  graphdef = state_lib.model_graphdef(cfg)

  @jax.jit
  def selected(params, other):
    model = nnx.view(nnx.merge(graphdef, params, other), record_selection=True)
    _, selections = nnx.capture(model, nnx.Intermediate)(tokens[:, :-1])
    return [v.get_value()[0] for path, v in nnx.to_flat_state(selections)
            if path[-1] == SELECTION]

  return np.unique(np.concatenate([np.ravel(s) for s in selected(state.params, state.other)]))


def table(params):
  return np.asarray(params["layers"][0]["feed_forward"]["values"][...])


def tokens_for(seed, batch=4, length=17):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 258, (batch, length)), jnp.int32)


def test_without_decay_one_sparse_step_is_dense_adamw_on_the_touched_rows_and_leaves_the_rest():
  # Over two micro-batches: their rows, and the two layers' rows, are merged before the update.
  tokens = tokens_for(0)
  before, dense, dense_metrics, touched = one_step(
      [*F64, "train.grad_accum=2"], "dense", tokens, rows=False)
  _, sparse, sparse_metrics, _ = one_step([*F64, "train.grad_accum=2"], "sparse", tokens)
  assert 0 < len(touched) < table(before).shape[0] // 4
  for name in ("loss", "grad_norm/dense", "grad_norm/values"):
    np.testing.assert_allclose(sparse_metrics[name], dense_metrics[name], rtol=1e-6)
  np.testing.assert_allclose(table(sparse)[touched], table(dense)[touched], atol=1e-6)
  untouched = np.setdiff1d(np.arange(table(before).shape[0]), touched)
  np.testing.assert_array_equal(table(sparse)[untouched], table(before)[untouched])
  assert not np.array_equal(table(sparse)[touched], table(before)[touched])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sparse)[0], jax.tree.leaves(dense)):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_with_decay_the_touched_rows_step_as_dense_adamw_and_only_they_decay():
  tokens = tokens_for(1)
  before, dense, _, touched = one_step([*F64, "optim.weight_decay=0.1"], "dense", tokens, rows=False)
  _, sparse, _, _ = one_step([*F64, "optim.weight_decay=0.1"], "sparse", tokens)
  untouched = np.setdiff1d(np.arange(table(before).shape[0]), touched)
  np.testing.assert_array_equal(table(sparse)[untouched], table(before)[untouched])
  assert (np.abs(table(dense)[untouched]) < np.abs(table(before)[untouched])).mean() > 0.99
  np.testing.assert_allclose(table(sparse)[touched], table(dense)[touched], atol=1e-6)


def test_the_dense_update_from_row_gradients_is_the_dense_update_from_the_whole_gradient():
  # Two steps on the same tokens, with decay and two micro-batches: the second moves the
  # untouched rows by their moments as well as decaying them. float64: see F64.
  overrides = [*F64, "optim.weight_decay=0.1", "train.grad_accum=2"]
  cfg = config_loading.load("tiny", [*SMALL, *overrides])
  assert step_lib.row_gradients(cfg)  # the step's own choice at this size
  tokens = tokens_for(3)
  before, want, want_metrics, touched = steps(overrides, "dense", tokens, rows=False, n_steps=2)
  _, got, metrics, _ = steps(overrides, "dense", tokens, n_steps=2)
  for name in ("loss", "grad_norm/dense", "grad_norm/values"):
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-6)
  untouched = np.setdiff1d(np.arange(table(before.params).shape[0]), touched)
  for what in ("params", "opt_state"):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(getattr(got, what))[0],
                            jax.tree.leaves(getattr(want, what))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Off the touched rows the gradient is zero in both forms: the same operations, bit for bit.
  np.testing.assert_array_equal(table(got.params)[untouched], table(want.params)[untouched])
  assert not np.array_equal(table(got.params)[untouched], table(before.params)[untouched])


@pytest.fixture(scope="module")
def dense_single_device_x64(fast_compile_module):
  with jax.enable_x64(True):
    return run_steps(cfg_for((1, 1, 1), *X64), jax.devices()[:1], 3, rows=False)[0]


def test_the_dense_update_from_row_gradients_takes_the_dense_steps_on_a_mesh(
    dense_single_device_x64):
  # Tokens over data and fsdp, the table's columns over memory and its rows over fsdp: the
  # mesh where the row write and the whole-table pass are split most ways.
  _, _, want_params, want_losses = dense_single_device_x64
  with jax.enable_x64(True):
    (_, _, params, losses), _ = run_steps(
        cfg_for((1, 2, 4), *X64, "mesh.table_rows_over_fsdp=true"), jax.devices(), 3, rows=True)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert_close(params, want_params, "parameter after 3 dense steps from row gradients")


# Rows of 128 lanes, which the pallas_tpu kernels copy (narrower tables go to their XLA twin).
ONE_LAYER = ["model.n_layers=1", "model.memory.layers=[0]", "model.memory.v_dim=128"]


def sparse_step_and_row_grads(impl):
  """One sparse step of the one-layer model with `impl`: (parameters before, after, metrics, the
  table's row gradient (R, V) of the step's batch)."""
  cfg = config_loading.load(
      "tiny", [*SMALL, *ONE_LAYER, f"model.memory.impl={impl}", "optim.table_update=sparse"])
  tokens = tokens_for(2, batch=2, length=9)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state = state_lib.create_state(cfg, mesh)
    row_grads = jax.jit(step_lib._row_grad_fn(state_lib.model_graphdef(cfg), 0.0))
    (_, _, rows), before = row_grads(state.params, state.other, tokens), jax.device_get(state)
    state, metrics = step_lib.jit_train_step(cfg, mesh)[0](state, tokens)
  (grads,) = [part.grads for parts in rows.values() for part in parts]
  return before.params, jax.device_get(state).params, metrics, np.asarray(grads)


@pytest.fixture(scope="module")
def xla_sparse_step(fast_compile_module):
  return sparse_step_and_row_grads("xla")


@pytest.mark.parametrize("impl", [p for p in ALL_IMPLS if p.values != ("xla",)])
def test_every_lookup_impl_gives_the_xla_sparse_step(impl, xla_sparse_step):
  before, want, want_metrics, want_grads = xla_sparse_step
  _, got, metrics, grads = sparse_step_and_row_grads(impl)
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
  # What the impl computes: the touched rows' gradient, to float32 rounding of its terms.
  np.testing.assert_allclose(grads, want_grads, atol=1e-6 * np.abs(want_grads).max())
  # The step: Adam's first step moves a coordinate by lr * g / (|g| + eps), whose slope
  # lr * eps / (|g| + eps)^2 turns a float32 rounding of a gradient within some 20 eps of zero
  # into more than 1e-6. Coordinates moved by less than 0.95 lr (|g| < ~20 eps) are held to the
  # bound lr, the rest to 1e-6.
  moved = np.abs(table(want) - table(before))
  lr = moved.max()
  conditioned = moved > 0.95 * lr
  np.testing.assert_allclose(table(got)[conditioned], table(want)[conditioned], atol=1e-6)
  assert np.abs(table(got) - table(want)).max() <= lr


@pytest.fixture(scope="module")
def sparse_single_device_x64(fast_compile_module):
  with jax.enable_x64(True):
    return run_steps(cfg_for((1, 1, 1), *X64, "optim.table_update=sparse"), jax.devices()[:1], 3)[0]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_takes_the_sparse_steps_of_one_device(shape, sparse_single_device_x64):
  _, _, want_params, want_losses = sparse_single_device_x64
  rows_over_fsdp = ["mesh.table_rows_over_fsdp=true"] if shape[1] > 1 else []
  with jax.enable_x64(True):
    (_, _, params, losses), _ = run_steps(
        cfg_for(shape, *X64, "optim.table_update=sparse", *rows_over_fsdp), jax.devices(), 3)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert_close(params, want_params, "parameter after 3 sparse steps")


def test_a_stopped_and_resumed_sparse_run_repeats_the_uninterrupted_one_bitwise(tmp_path, data_dir):
  cfg = smoke_config(data_dir, "train.eval_every=100", "optim.table_update=sparse")
  loop.run(cfg, tmp_path / "whole", log=lambda _: None)
  loop.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=3)),
           tmp_path / "parts", log=lambda _: None)
  loop.run(cfg, tmp_path / "parts", log=lambda _: None)
  assert logged(tmp_path / "parts", "train/loss") == logged(tmp_path / "whole", "train/loss")


@pytest.mark.parametrize("overrides", [
    ["optim.table_update=lazy"], ["optim.table_update=sparse", "model.memory.layers=[]"]])
def test_a_bad_table_update_names_the_field(overrides):
  with pytest.raises(config.ConfigError, match="table_update"):
    config_loading.load("tiny", overrides)
