"""The pure train and eval steps: functions of (state, batch), jitted once by the loop.

Batches are int32 (B, T + 1) token windows: inputs are [:, :-1], next-token targets [:, 1:].

Axis letters (see memjax): B batch, T time (a batch's `tokens_BT` holds T + 1 positions), W
vocabulary, A micro-batches, S slots, U distinct rows, V value dim.

The value tables' gradient takes one of two forms (`row_gradients`). Dense: the table is
differentiated like any parameter, an (S, V) array. Rows: the table is not differentiated; each
memory layer reads a compact copy of the rows it touches, and the gradient of that copy is
captured (an `nnx.Perturbation`). The sparse update always takes rows (it updates those alone);
the dense update takes them when a micro-batch can touch at most a quarter of the table, and
then moves every row with a pass over the table and its moments that reads no gradient
(`memjax.optim`). Either update is the same maths in both forms.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import Config
from memjax.layers.memory import TABLE_ROW_IDS, TABLE_ROWS, MemoryValues, ProductKeyMemory
from memjax.model import balance_loss, cross_entropy
from memjax.ops.table_rows import merge_rows, row_capacity
from memjax.optim import AdamW, RowGrads, group_norms
from memjax.training.state import TrainState


def _loss(graphdef, params, other, tokens_BT, balance_coef: float = 0.0):
  """The training loss: cross-entropy plus `balance_coef` times the MoE layers' balance loss
  (0 without MoE layers). Aux: (other state, cross-entropy, balance loss)."""
  # A copy: merge would otherwise reuse the state's Variables, made outside this trace, and
  # dropout's RNG counts could not be advanced in it.
  model = nnx.merge(graphdef, params, other, copy=True)
  inputs_BT = tokens_BT[:, :-1]
  if balance_coef:  # only MoE models record anything the loss needs
    view = nnx.view(model, record_balance_loss=True, raise_if_not_found=False)
    logits_BTW, intermediates = nnx.capture(view, nnx.Intermediate)(inputs_BT)
    balance = balance_loss(intermediates)
  else:
    logits_BTW, balance = model(inputs_BT), jnp.float32(0)
  ce = cross_entropy(logits_BTW, tokens_BT[:, 1:])
  _, _, other = nnx.split(model, nnx.Param, ...)  # dropout RNG counters advanced
  return ce + balance_coef * balance, (other, ce, balance)


def _table_paths(model: nnx.Module) -> dict[tuple, tuple]:
  """Each memory layer's path -> the path of the table it reads (shared tables appear once in
  the state, at their first path)."""
  table_at, layers = {}, {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, MemoryValues):
      table_at.setdefault(id(node), path)
    elif isinstance(node, ProductKeyMemory):
      layers[path] = node
  return {path: table_at[id(layer.values)] for path, layer in layers.items()}


def row_gradients(cfg: Config) -> bool:
  """Whether the step takes the value tables' gradient as the rows a micro-batch touches.

  Always for the sparse update. For the dense one when the rows that the layers sharing a table
  read in a micro-batch are at most a quarter of it: the compact rows cost a sort of the ids and a few passes over the rows, the (S, V)
  gradient a zeroed table, a scatter into it and a read of it in the update.
  """
  if cfg.optim.table_update == "sparse":
    return True
  if not cfg.model.memory.enabled:
    return False
  mem = cfg.model.memory
  readers = len(mem.layers) if mem.share_values else 1
  ids = cfg.train.batch_size // cfg.train.grad_accum * cfg.train.seq_len * mem.heads * mem.knn
  return 4 * row_capacity(readers * ids, mem.n_slots) <= mem.n_slots


def _row_grad_fn(graphdef: nnx.GraphDef, balance_coef: float) -> Callable:
  """grad_fn(params, other, tokens_BT) -> ((loss, (other, ce, balance)), dense grads, rows):
  the gradient of every parameter but the value tables, and per table path a list of
  `RowGrads`, one per memory layer that reads it."""

  def rows_view(params, other):
    model = nnx.view(nnx.merge(graphdef, params, other, copy=True), only=ProductKeyMemory,
                     sparse_table_grad=True)
    return nnx.view(model, record_balance_loss=bool(balance_coef), raise_if_not_found=False)

  def loss(rest, probes, tables, other, tokens_BT):
    view = rows_view(nnx.merge_state(rest, tables), other)
    logits_BTW, _, intermediates = nnx.capture(
        view, nnx.Perturbation, nnx.Intermediate, init=probes)(tokens_BT[:, :-1])
    balance = balance_loss(intermediates) if balance_coef else jnp.float32(0)
    ce = cross_entropy(logits_BTW, tokens_BT[:, 1:])
    _, _, other = nnx.split(view, nnx.Param, ...)
    row_ids = {path[:-1]: v.get_value() for path, v in nnx.to_flat_state(intermediates)
               if path[-1] == TABLE_ROW_IDS}
    return ce + balance_coef * balance, (other, ce, balance, row_ids)

  def zero_probes(params, other, tokens_BT):
    """The captured rows' perturbations, zeros: their shapes follow the batch's."""
    def probes(params, other):
      return nnx.capture(rows_view(params, other), nnx.Perturbation)(tokens_BT[:, :-1])[1]
    shapes = jax.eval_shape(probes, params, other)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  def row_grads(params, other, tokens_BT):
    tables, rest = nnx.split_state(params, MemoryValues, ...)
    probes = zero_probes(params, other, tokens_BT)
    (total, (other_out, ce, balance, row_ids)), (grads, probe_grads) = grad_fn(
        rest, probes, tables, other, tokens_BT)
    probe_grads = dict(nnx.to_flat_state(probe_grads))
    rows = {}
    for layer, table in _table_paths(nnx.merge(graphdef, params, other)).items():
      grads_UV = probe_grads[(*layer, TABLE_ROWS)].get_value()
      rows.setdefault(table, []).append(RowGrads(row_ids[layer], grads_UV))
    return (total, (other_out, ce, balance)), grads, rows

  return row_grads


def _merged_rows(rows: dict[tuple, list[RowGrads]], params, accum: int) -> dict[tuple, RowGrads]:
  """One `RowGrads` per table: repeated rows summed over layers and micro-batches, averaged
  over the micro-batches, in the table's dtype."""
  tables = dict(nnx.to_flat_state(params))
  merged = {}
  for path, parts in rows.items():
    table = tables[path].get_value()
    ids, grads = merge_rows([p.rows for p in parts], [p.grads for p in parts], table.shape[0])
    if accum > 1:
      grads = grads.astype(jnp.float32) / accum
    merged[path] = RowGrads(ids, grads.astype(table.dtype))
  return merged


# The running mean of the loss that `train.loss_spike_factor` compares with: about the last 100
# applied steps, slow enough that a falling loss keeps it above the current one.
LOSS_MEAN_DECAY = 0.99


def make_train_step(
    cfg: Config, graphdef: nnx.GraphDef, tx: AdamW, schedule: Callable,
    rows: bool | None = None,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """train_step(state, tokens_BT) -> (state, metrics), with gradient accumulation over
  `train.grad_accum` micro-batches and a guard that skips a step whose loss or gradients are not
  finite or whose loss passes `train.loss_spike_factor` times its running mean (parameters and
  optimizer state unchanged; counted).

  `rows` forces the tables' gradient form (default: `row_gradients(cfg)`); the update's maths
  stay `optim.table_update`'s either way."""
  accum = cfg.train.grad_accum
  spike = cfg.train.loss_spike_factor
  coef = cfg.model.moe.balance_coef if cfg.model.moe.layers else 0.0
  by_rows = row_gradients(cfg) if rows is None else rows
  if cfg.optim.table_update == "sparse" and not by_rows:
    raise ValueError("optim.table_update=sparse needs the tables' gradient as rows")
  if by_rows:
    grad_fn = _row_grad_fn(graphdef, coef)
  else:
    dense_fn = jax.value_and_grad(lambda p, o, t: _loss(graphdef, p, o, t, coef), has_aux=True)
    grad_fn = lambda p, o, t: (*dense_fn(p, o, t), {})

  def accumulated_grads(state: TrainState, tokens_BT: jax.Array):
    """(other, grads, rows, cross-entropy, balance loss), averaged over the micro-batches in
    float32; a table's gradient rows are gathered per micro-batch and merged after."""
    micro_ABT = tokens_BT.reshape(accum, -1, tokens_BT.shape[-1])

    def micro_step(carry, tokens):
      other, grad_sum, ce_sum, balance_sum = carry
      (_, (other, ce, balance)), grads, rows = grad_fn(state.params, other, tokens)
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (other, grad_sum, ce_sum + ce, balance_sum + balance), rows

    params = nnx.split_state(state.params, MemoryValues, ...)[1] if by_rows else state.params
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (other, grad_sum, ce_sum, balance_sum), rows_A = jax.lax.scan(
        micro_step, (state.other, zeros, jnp.float32(0), jnp.float32(0)), micro_ABT
    )
    grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, params)
    rows = {path: [RowGrads(part.rows[a], part.grads[a]) for part in parts for a in range(accum)]
            for path, parts in rows_A.items()}
    return other, grads, rows, ce_sum / accum, balance_sum / accum

  def train_step(state: TrainState, tokens_BT: jax.Array) -> tuple[TrainState, dict]:
    if accum == 1:
      # The same values bit for bit, without a float32 carry as large as the parameters: a
      # zeroed buffer, an add and a cast back over every parameter, the whole table included.
      (_, (other, loss, balance)), grads, rows = grad_fn(state.params, state.other, tokens_BT)
    else:
      other, grads, rows, loss, balance = accumulated_grads(state, tokens_BT)
    rows = _merged_rows(rows, state.params, accum)
    # loss (reported) is the cross-entropy alone, comparable across models.
    norms = group_norms(grads, rows)
    # A sum of squares is finite iff every term is (and none overflows, a step the clip would
    # zero anyway): the guard rides on the norms' pass instead of its own over every gradient.
    finite = jnp.isfinite(loss + balance) & jnp.all(jnp.isfinite(jnp.stack(list(norms.values()))))
    if spike:  # a loss far above the running mean: a diverging step, skipped like a NaN
      finite &= (state.loss_mean == 0) | (loss <= spike * state.loss_mean)
    # The update applies `finite` itself, in its one pass per parameter: a check of the updated
    # parameters would need the old ones kept beside them (every table and moment twice).
    params, opt_state = tx.apply(grads, state.opt_state, state.params, norms, finite, rows)
    keep = lambda n, o: jnp.where(finite, n, o)
    mean = jnp.where(state.loss_mean == 0, loss, LOSS_MEAN_DECAY * state.loss_mean
                     + (1 - LOSS_MEAN_DECAY) * loss)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        other=jax.tree.map(keep, other, state.other),
        opt_state=opt_state,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        loss_mean=jnp.where(finite, mean.astype(jnp.float32), state.loss_mean),
    )
    metrics = {"loss": loss, "finite": finite, "lr": schedule(state.step),
               **{f"grad_norm/{group}": norm for group, norm in norms.items()}}
    if cfg.model.memory.enabled:  # the value table's group: its own base rate, the same schedule
      metrics["lr_values"] = tx.base_lr["values"] * tx.multiplier(state.step)
    if coef:
      metrics["balance_loss"] = balance
    return new_state, metrics

  return train_step


def jit_train_step(
    cfg: Config, mesh: jax.sharding.Mesh, rows: bool | None = None
) -> tuple[Callable, Callable]:
  """The train step jitted with the state's and the batch's shardings on `mesh` and the state
  donated; and a function giving its abstract (state, batch) arguments, for an ahead-of-time
  compile. `rows` as in `make_train_step`."""
  from memjax import optim, sharding
  from memjax.training import state as state_lib

  schedule = optim.config_lr_multiplier(cfg)
  train_step = make_train_step(
      cfg, state_lib.model_graphdef(cfg), optim.make_optimizer(cfg),
      lambda step: cfg.optim.lr * schedule(step), rows,
  )
  shardings = state_lib.state_shardings(cfg, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(
      train_step,
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )

  def abstract_args():
    batch = jax.ShapeDtypeStruct(
        (cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32, sharding=batch_sharding
    )
    return state_lib.abstract_state(cfg, mesh), batch

  return jitted, abstract_args


def make_eval_step(cfg: Config, graphdef: nnx.GraphDef) -> Callable:
  """eval_step(params, other, tokens_BT) -> (summed token loss, token count, selections)."""
  del cfg

  def eval_step(params, other, tokens_BT):
    model = nnx.view(
        nnx.merge(graphdef, params, other), deterministic=True, record_selection=True,
        raise_if_not_found=False,
    )
    logits, selections = nnx.capture(model, nnx.Intermediate)(tokens_BT[:, :-1])
    n_tokens = tokens_BT[:, 1:].size
    return cross_entropy(logits, tokens_BT[:, 1:]) * n_tokens, n_tokens, selections

  return eval_step
