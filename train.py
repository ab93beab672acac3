"""Trains a memjax language model.

  python train.py                               # configs/tiny.yaml on this package's own text
  python train.py config=configs/X.yaml key=value ...   # e.g. train.steps=1000 model.dim=256
"""

from __future__ import annotations

import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from memjax import config as config_lib
from memjax import data, optim
from memjax.model import Transformer, cross_entropy


def parse_args(argv: list[str]) -> config_lib.Config:
  path, overrides = config_lib.DEFAULT_CONFIG, []
  for arg in argv:
    if arg.startswith("config="):
      path = arg.split("=", 1)[1]
    elif arg in ("-h", "--help"):
      print(__doc__)
      sys.exit(0)
    else:
      overrides.append(arg)
  return config_lib.load(path, overrides)


def main(argv: list[str]) -> None:
  cfg = parse_args(argv)
  if cfg.model.vocab_size < 258:
    raise config_lib.ConfigError("model.vocab_size", "train.py feeds bytes: needs >= 258")
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(cfg)
  opt_state = tx.init(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"model: {n_params / 1e6:.2f}M parameters, memory layers {list(cfg.model.memory.layers)}")

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch_BT):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, rest)
      return cross_entropy(model(batch_BT[:, :-1]), batch_BT[:, 1:])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = data.read_corpus([cfg.train.data] if cfg.train.data else data.default_globs())
  print(f"data: {len(tokens):,} byte tokens")
  batches = data.random_windows(tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.seed)
  tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
  start, losses = time.perf_counter(), []
  with tqdm(range(1, cfg.train.steps + 1), unit="step", dynamic_ncols=True) as bar:
    for step in bar:
      params, opt_state, loss = train_step(params, opt_state, next(batches))
      losses.append(loss)
      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        loss = float(np.mean(jax.device_get(losses)))
        losses = []
        rate = step * tokens_per_step / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        bar.write(f"step {step}: loss {loss:.4f} ({rate:,.0f} tokens/s)")


if __name__ == "__main__":
  main(sys.argv[1:])
