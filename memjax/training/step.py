"""The pure train and eval steps: functions of (state, batch), jitted once by the loop.

Batches are int32 (B, T + 1) token windows: inputs are [:, :-1], next-token targets [:, 1:].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import Config
from memjax.model import balance_loss, cross_entropy
from memjax.optim import AdamW, group_norms
from memjax.training.state import TrainState


def _loss(graphdef, params, other, tokens_BT1, balance_coef: float = 0.0):
  """The training loss: cross-entropy plus `balance_coef` times the MoE layers' balance loss
  (0 without MoE layers). Aux: (other state, cross-entropy, balance loss)."""
  model = nnx.merge(graphdef, params, other)
  inputs_BT = tokens_BT1[:, :-1]
  if balance_coef:  # only MoE models record anything the loss needs
    logits_BTW, intermediates = nnx.capture(model, nnx.Intermediate)(inputs_BT)
    balance = balance_loss(intermediates)
  else:
    logits_BTW, balance = model(inputs_BT), jnp.float32(0)
  ce = cross_entropy(logits_BTW, tokens_BT1[:, 1:])
  _, _, other = nnx.split(model, nnx.Param, ...)  # dropout RNG counters advanced
  return ce + balance_coef * balance, (other, ce, balance)


def make_train_step(
    cfg: Config, graphdef: nnx.GraphDef, tx: AdamW, schedule: Callable
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """train_step(state, tokens_BT1) -> (state, metrics), with gradient accumulation over
  `train.grad_accum` micro-batches and a guard that skips a step whose loss or gradients are not
  finite (parameters and optimizer state unchanged; counted)."""
  accum = cfg.train.grad_accum
  coef = cfg.model.moe.balance_coef if cfg.model.moe.layers else 0.0
  grad_fn = jax.value_and_grad(lambda p, o, t: _loss(graphdef, p, o, t, coef), has_aux=True)

  def accumulated_grads(state: TrainState, tokens_BT1: jax.Array):
    """(other, grads, cross-entropy, balance loss), averaged over the micro-batches in float32."""
    micro_ABT1 = tokens_BT1.reshape(accum, -1, tokens_BT1.shape[-1])

    def micro_step(carry, tokens):
      other, grad_sum, ce_sum, balance_sum = carry
      (_, (other, ce, balance)), grads = grad_fn(state.params, other, tokens)
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (other, grad_sum, ce_sum + ce, balance_sum + balance), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (other, grad_sum, ce_sum, balance_sum), _ = jax.lax.scan(
        micro_step, (state.other, zeros, jnp.float32(0), jnp.float32(0)), micro_ABT1
    )
    grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, state.params)
    return other, grads, ce_sum / accum, balance_sum / accum

  def train_step(state: TrainState, tokens_BT1: jax.Array) -> tuple[TrainState, dict]:
    if accum == 1:
      # The same values bit for bit, without a float32 carry as large as the parameters: a
      # zeroed buffer, an add and a cast back over every parameter, the whole table included.
      (_, (other, loss, balance)), grads = grad_fn(state.params, state.other, tokens_BT1)
    else:
      other, grads, loss, balance = accumulated_grads(state, tokens_BT1)
    # loss (reported) is the cross-entropy alone, comparable across models.
    norms = group_norms(grads)
    # A sum of squares is finite iff every term is (and none overflows, a step the clip would
    # zero anyway): the guard rides on the norms' pass instead of its own over every gradient.
    finite = jnp.isfinite(loss + balance) & jnp.all(jnp.isfinite(jnp.stack(list(norms.values()))))
    params, opt_state = tx.apply(grads, state.opt_state, state.params, norms, finite)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        other=jax.tree.map(lambda n, o: jnp.where(finite, n, o), other, state.other),
        opt_state=opt_state,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {"loss": loss, "finite": finite, "lr": schedule(state.step),
               **{f"grad_norm/{group}": norm for group, norm in norms.items()}}
    if coef:
      metrics["balance_loss"] = balance
    return new_state, metrics

  return train_step


def jit_train_step(cfg: Config, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """The train step jitted with the state's and the batch's shardings on `mesh` and the state
  donated; and a function giving its abstract (state, batch) arguments, for an ahead-of-time
  compile."""
  from memjax import optim, sharding
  from memjax.training import state as state_lib

  schedule = optim.lr_multiplier(
      cfg.train.steps, cfg.train.warmup, cfg.train.lr_min_ratio, cfg.train.scheduler
  )
  train_step = make_train_step(
      cfg, state_lib.model_graphdef(cfg), optim.make_optimizer(cfg),
      lambda step: cfg.train.lr * schedule(step),
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
  """eval_step(params, other, tokens_BT1) -> (summed token loss, token count, selections)."""
  del cfg

  def eval_step(params, other, tokens_BT1):
    model = nnx.view(nnx.merge(graphdef, params, other), deterministic=True, raise_if_not_found=False)
    logits, selections = nnx.capture(model, nnx.Intermediate)(tokens_BT1[:, :-1])
    n_tokens = tokens_BT1[:, 1:].size
    return cross_entropy(logits, tokens_BT1[:, 1:]) * n_tokens, n_tokens, selections

  return eval_step
